"""Train the digit CNN on MNIST and real pen handwriting, checkpointing every epoch so that no
crash loses progress.

    python train.py --download          # full run with the defaults: minutes on 2 CPU cores
    python train.py --limit 2000 --epochs 2 --out /tmp/m.pth --checkpoint-dir /tmp/ckpt
    python train.py --sources mnist     # MNIST alone, as before pen digits

The pen digits (`pendigits.py`) are drawn as the app's canvas draws them and taken through
`utils.preprocess`; the digits of a few writers are kept out of training (`--held-out-writers`)
and the model's accuracy on them, per digit and with its worst confusions, goes to model.json.

Kill it at any moment (SIGKILL, OOM, power loss) and run the same command again: it resumes from
the newest checkpoint that loads. SIGTERM or Ctrl-C (what `docker stop` sends) saves a checkpoint
of the epoch in progress first, then exits with code 143.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import augment
import mnist
import model as model_lib
import pendigits
import utils
from model import DigitCNN

log = logging.getLogger("train")

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_TERMINATED = 143
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-e(\d{4})-s(\d{6})\.pt$")
# Settings a checkpoint must share with the current run to be resumed by it.
RUN_SETTINGS = (
    "epochs", "batch_size", "lr", "seed", "limit",
    "sources", "pen_share", "pen_views", "held_out_writers",
)  # fmt: skip
SOURCES = ("mnist", "pen")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=12, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate (one-cycle)")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=mnist.data_dir_from_env(),
        help="folder with the four MNIST *-ubyte.gz files (env MNIST_DIR)",
    )
    parser.add_argument(
        "--sources",
        type=_sources,
        default="mnist,pen",
        help="training data, comma-separated: mnist (scanned paper), pen (pen trajectories)",
    )
    parser.add_argument(
        "--pen-file",
        type=Path,
        default=pendigits.default_path(),
        help=f"the UNIPEN pen digits file (env PENDIGITS_DIR: the folder holding "
        f"{pendigits.FILE_NAME})",
    )
    parser.add_argument(
        "--pen-share",
        type=float,
        default=0.4,
        help="with both sources, the fraction of each epoch's images that are pen digits",
    )
    parser.add_argument(
        "--pen-views", type=int, default=4, help="renderings of each pen digit, cached"
    )
    parser.add_argument(
        "--held-out-writers",
        type=_writers,
        default=",".join(map(str, pendigits.HELD_OUT_WRITERS)),
        help="pen writers kept out of training to measure the model on (or 'none')",
    )
    parser.add_argument(
        "--download", action="store_true", help="fetch MNIST and the pen digits if missing"
    )
    parser.add_argument("--out", type=Path, default=Path("models/model.pth"), help="final model")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=Path("models/checkpoints"), help="checkpoints"
    )
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--log-every", type=float, default=5.0, help="seconds between lines")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.keep < 1:
        parser.error("--epochs, --batch-size and --keep must be >= 1 and --lr > 0")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if not 0 < args.pen_share < 1 or args.pen_views < 1:
        parser.error("--pen-share must be between 0 and 1 (exclusive), --pen-views >= 1")
    return args


def _sources(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names or set(names) - set(SOURCES):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(SOURCES)}")
    return names


def _writers(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: writer ids, comma-separated") from None


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"--device {name}: CUDA is not available on this machine")
    return device


def memory_mb() -> tuple[float, float]:
    """Resident set size and its peak for this process, in MB (Linux /proc)."""
    values = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


class SetupError(RuntimeError):
    """The run cannot start as asked (bad device, checkpoints of another run); no traceback."""


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived; the run stops at the next step boundary."""


@dataclass
class StopFlag:
    signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        # A second signal is not ignored: it gets the default behaviour.
        signal.signal(signum, signal.SIG_DFL)

    def check(self) -> None:
        if self.signal_name:
            raise StopRequested(self.signal_name)


# --- checkpoints -----------------------------------------------------------------------------


def checkpoint_name(epoch: int, step: int) -> str:
    """`epoch` epochs are complete and `step` steps of the next one are done."""
    return f"checkpoint-e{epoch:04d}-s{step:06d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, newest (furthest in training) first."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), int(m.group(2)), path)
        for path in directory.iterdir()
        if (m := CHECKPOINT_PATTERN.match(path.name))
    ]
    return [path for _, _, path in sorted(found, reverse=True)]


def atomic_save(obj: object, path: Path) -> None:
    """torch.save, atomically (mnist.atomic_file): the file is whole or absent."""
    with mnist.atomic_file(path) as handle:
        torch.save(obj, handle)


def atomic_write_text(text: str, path: Path) -> None:
    with mnist.atomic_file(path) as handle:
        handle.write(text.encode())


def load_newest_checkpoint(directory: Path, settings: dict) -> dict | None:
    """The newest checkpoint that loads, skipping (and reporting) corrupt ones."""
    for path in list_checkpoints(directory):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "model" not in state:
                raise ValueError("not a checkpoint written by train.py")
        except Exception as exc:  # any unreadable file is skipped, never fatal
            log.warning("skipping corrupt checkpoint %s: %s", path.name, exc)
            continue
        saved = state.get("settings") or {}
        if (sources := saved.get("sources", ["mnist"])) != settings["sources"]:
            raise SetupError(
                f"{path} was written by a run trained on {'+'.join(sources)}"
                f"; this run asks for {'+'.join(settings['sources'])}. A model cannot switch data "
                f"half-way: use the same --sources, another --checkpoint-dir, or --fresh."
            )
        if saved != settings:
            raise SetupError(
                f"{path} was written by a run with other settings ({state.get('settings')}); "
                f"this run has {settings}. Use the same flags, another --checkpoint-dir, "
                f"or --fresh to start over."
            )
        state["path"] = path
        return state
    return None


def prune_checkpoints(directory: Path, keep: int) -> None:
    for path in list_checkpoints(directory)[keep:]:
        path.unlink(missing_ok=True)
    for stale in directory.glob(".checkpoint-*.tmp"):
        stale.unlink(missing_ok=True)


# --- training --------------------------------------------------------------------------------


def epoch_order(n_mnist: int, n_pen: int, pen_count: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled indices of epoch `epoch` into MNIST's images followed by the pen renderings:
    every MNIST image and `pen_count` pen renderings. A function of the seed, so a resume can
    replay it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    rounds = -(-pen_count // n_pen) if n_pen else 0  # more pen images than renderings: repeat
    pen = torch.cat(
        [torch.randperm(n_pen, generator=generator) for _ in range(rounds)] or [torch.arange(0)]
    )
    chosen = torch.cat([torch.arange(n_mnist), n_mnist + pen[:pen_count]])
    return chosen[torch.randperm(len(chosen), generator=generator)]


@dataclass
class TrainingData:
    images: torch.Tensor  # (N, 28, 28) uint8: MNIST's training images, then the pen renderings
    labels: torch.Tensor
    n_mnist: int
    pen_per_epoch: int
    test_images: torch.Tensor  # MNIST's test set, raw (through utils.preprocess at the end)
    test_labels: torch.Tensor
    held_out_images: torch.Tensor  # the held-out writers' digits, rendered and preprocessed
    held_out_labels: torch.Tensor

    @property
    def per_epoch(self) -> int:
        return self.n_mnist + self.pen_per_epoch


def load_data(args: argparse.Namespace) -> TrainingData:
    """MNIST and the pen digits as the run's settings ask, the pen renderings from their cache
    in the checkpoint folder when an earlier run of the same settings made them."""
    empty_images = torch.empty((0, 28, 28), dtype=torch.uint8)
    empty_labels = torch.empty(0, dtype=torch.int64)
    if args.download and "mnist" in args.sources:
        mnist.download(args.data_dir)
    if args.download and "pen" in args.sources:
        pendigits.download(args.pen_file)
    test_images, test_labels = mnist.load_split(args.data_dir, "test")
    images, labels = empty_images, empty_labels
    if "mnist" in args.sources:
        images, labels = mnist.load_split(args.data_dir, "train")
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
        test_images, test_labels = test_images[: args.limit], test_labels[: args.limit]
    n_mnist = len(images)
    held_images, held_labels, pen_per_epoch = empty_images, empty_labels, 0
    if "pen" in args.sources:
        digits = pendigits.load(args.pen_file)
        trained, held_out = pendigits.split_writers(digits, args.held_out_writers)
        if args.limit:
            trained, held_out = trained[: args.limit], held_out[: args.limit]
        if not trained:
            raise mnist.DatasetError(f"{args.pen_file}: no digits left once writers are held out")
        pen_images, pen_labels = cached_renderings(args, trained, args.pen_views, vary=True)
        held_images, held_labels = cached_renderings(args, held_out, 1, vary=False)
        images, labels = torch.cat([images, pen_images]), torch.cat([labels, pen_labels])
        share = args.pen_share if n_mnist else 1.0
        pen_per_epoch = len(pen_images) if not n_mnist else round(n_mnist * share / (1 - share))
        log.info(
            "pen digits: %d of %d writers for training (%d renderings, %d per epoch), %d digits "
            "of writers %s held out",
            len(trained),
            len({digit.writer for digit in trained}),
            len(pen_images),
            pen_per_epoch,
            len(held_out),
            ",".join(map(str, args.held_out_writers)) or "none",
        )
    return TrainingData(
        images, labels, n_mnist, pen_per_epoch, test_images, test_labels, held_images, held_labels
    )


def cached_renderings(
    args: argparse.Namespace, digits: Sequence[pendigits.PenDigit], views: int, vary: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pendigits.render_for_training`, kept in the checkpoint folder: a resumed run does not
    draw them again. The file name holds a digest of everything the renderings depend on."""
    if not digits:
        return torch.empty((0, 28, 28), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    digest = hashlib.sha256(repr((pendigits.RENDERING, args.seed, views, vary)).encode())
    for digit in digits:
        digest.update(bytes([digit.label]))
        for stroke in digit.strokes:
            digest.update(stroke.tobytes() + b"|")
    path = args.checkpoint_dir / f"pen-renderings-{digest.hexdigest()[:16]}.pt"
    try:
        cached = torch.load(path, weights_only=True)
        log.info("pen renderings from %s", path)
        return cached["images"], cached["labels"]
    except FileNotFoundError:
        pass
    except Exception as exc:  # a damaged cache is drawn again, never fatal
        log.warning("ignoring damaged cache %s: %s", path.name, exc)
    started = time.perf_counter()
    images, labels = pendigits.render_for_training(digits, views, seed=args.seed, vary=vary)
    log.info(
        "drew %d pen renderings in %.0f s (cached in %s)",
        len(images),
        time.perf_counter() - started,
        path,
    )
    atomic_save({"images": images, "labels": labels}, path)
    return images, labels


def train(args: argparse.Namespace, stop: StopFlag) -> dict:
    started = time.perf_counter()
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log.info(
        "torch %s on %s with %d threads; pid %d",
        torch.__version__,
        device,
        torch.get_num_threads(),
        os.getpid(),
    )

    data = load_data(args)
    log.info(
        "data: %d images per epoch (%d MNIST, %d pen), %d MNIST test images from %s",
        data.per_epoch,
        data.n_mnist,
        data.pen_per_epoch,
        len(data.test_images),
        args.data_dir,
    )

    net = DigitCNN().to(device).to(memory_format=torch.channels_last)
    steps_per_epoch = -(-data.per_epoch // args.batch_size)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )
    settings = {
        name: list(value) if isinstance(value := getattr(args, name), tuple) else value
        for name in RUN_SETTINGS
    }
    history: list[dict] = []
    first_epoch, first_step, trained_seconds = 0, 0, 0.0

    if args.fresh:
        log.info("--fresh: ignoring checkpoints in %s", args.checkpoint_dir)
    elif state := load_newest_checkpoint(args.checkpoint_dir, settings):
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        first_epoch, first_step = state["epoch"], state["step"]
        history, trained_seconds = state["history"], state["trained_seconds"]
        log.info(
            "resuming from epoch %d step %d (%s): continuing with epoch %d/%d",
            first_epoch,
            first_step,
            state["path"].name,
            first_epoch + 1,
            args.epochs,
        )
    else:
        log.info("no checkpoint in %s: starting from scratch", args.checkpoint_dir)

    def save_checkpoint(epoch: int, step: int) -> Path:
        path = args.checkpoint_dir / checkpoint_name(epoch, step)
        state = {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "epoch": epoch,
            "step": step,
            "settings": settings,
            "history": history,
            "trained_seconds": trained_seconds + time.perf_counter() - session_start,
        }
        atomic_save(state, path)
        prune_checkpoints(args.checkpoint_dir, args.keep)
        return path

    dataset = TensorDataset(data.images, data.labels)
    session_start = time.perf_counter()
    progress = Progress(epoch=first_epoch, step=first_step)
    try:
        for epoch in range(first_epoch, args.epochs):
            progress.epoch = epoch
            n_pen = len(data.images) - data.n_mnist
            order = epoch_order(data.n_mnist, n_pen, data.pen_per_epoch, args.seed, epoch)
            order = order[progress.step * args.batch_size :]
            loader = DataLoader(
                dataset,
                batch_size=args.batch_size,
                sampler=order.tolist(),
                num_workers=args.workers,
                persistent_workers=False,
            )
            train_one_epoch(
                net, loader, optimizer, scheduler, device, args, progress, steps_per_epoch, stop
            )
            test_accuracy = pixels_accuracy(net, data.test_images, data.test_labels, device)
            history.append({"epoch": epoch + 1, "test_accuracy": test_accuracy})
            held_out = ""
            if len(data.held_out_labels):
                pen = pixels_accuracy(net, data.held_out_images, data.held_out_labels, device)
                history[-1]["pen_held_out_accuracy"] = pen
                held_out = f", held-out pen writers {pen:.2%}"
            rss, peak = memory_mb()
            log.info(
                "epoch %d/%d done: test accuracy %.2f%%%s, lr %.4f, rss %.0f MB (peak %.0f MB), "
                "%.0f s so far",
                epoch + 1,
                args.epochs,
                100 * test_accuracy,
                held_out,
                scheduler.get_last_lr()[0],
                rss,
                peak,
                trained_seconds + time.perf_counter() - session_start,
            )
            progress.step = 0
            path = save_checkpoint(epoch + 1, 0)
            log.info("checkpoint saved: %s", path)
    except StopRequested as stopped:
        path = save_checkpoint(progress.epoch, progress.step)
        log.warning(
            "%s received: checkpoint of epoch %d step %d saved to %s; run the same command "
            "to resume",
            stopped,
            progress.epoch + 1,
            progress.step,
            path,
        )
        raise

    trained_seconds += time.perf_counter() - session_start
    net = net.to(memory_format=torch.contiguous_format).eval()
    log.info("training done in %.0f s; evaluating through utils.preprocess", trained_seconds)
    net = net.cpu()
    test = accuracy_report(
        predicted_digits(net, (image.numpy() for image in data.test_images)),
        data.test_labels.tolist(),
    )
    log.info("MNIST test set: %.2f%% of %d", 100 * test["accuracy"], len(data.test_labels))
    metrics = {
        "test_accuracy": test["accuracy"],
        "training_images": {"mnist": data.n_mnist, "pen": len(data.images) - data.n_mnist},
    }
    if len(data.held_out_labels):
        # The held-out renderings went through utils.preprocess already: this is the app's path.
        predicted = model_lib.predict_batch(net, utils.normalize(data.held_out_images)[:, None])
        pen = accuracy_report([p.digit for p in predicted], data.held_out_labels.tolist())
        log.info(
            "pen digits, writers not trained on (%s): %.2f%% of %d; by digit %s; worst "
            "confusions %s",
            ",".join(map(str, args.held_out_writers)),
            100 * pen["accuracy"],
            len(data.held_out_labels),
            " ".join(f"{d}:{a:.1%}" for d, a in pen["by_digit"].items()),
            ", ".join(f"{c} x{n}" for c, n in pen["confusions"].items()) or "none",
        )
        metrics["pen_held_out"] = {"writers": list(args.held_out_writers), **pen}
    return write_model(net, args, metrics, trained_seconds, started)


@dataclass
class Progress:
    """Where training is: `epoch` epochs complete, `step` steps of the next one done."""

    epoch: int
    step: int


def train_one_epoch(
    net, loader, optimizer, scheduler, device, args, progress: Progress, steps_per_epoch, stop
) -> None:
    """Train from `progress.step` to the end of epoch `progress.epoch`, counting steps."""
    epoch = progress.epoch
    net.train()
    last_log = time.perf_counter()
    samples, loss_sum, correct = 0, 0.0, 0
    for images, labels in loader:
        stop.check()
        images = images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
        labels = labels.to(device, non_blocking=True)
        images = augment.augment(augment.flag_ones(images, labels))
        inputs = images.sub_(utils.MNIST_MEAN).div_(utils.MNIST_STD)
        inputs = inputs.contiguous(memory_format=torch.channels_last)

        logits = net(inputs)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.step += 1
        step = progress.step

        samples += len(labels)
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        now = time.perf_counter()
        if now - last_log >= args.log_every or step == steps_per_epoch:
            rss, _ = memory_mb()
            log.info(
                "epoch %d/%d step %d/%d loss %.4f acc %.2f%% %.0f samples/s rss %.0f MB",
                epoch + 1,
                args.epochs,
                step,
                steps_per_epoch,
                loss_sum / samples,
                100 * correct / samples,
                samples / (now - last_log),
                rss,
            )
            last_log, samples, loss_sum, correct = now, 0, 0.0, 0


def pixels_accuracy(net, images: torch.Tensor, labels: torch.Tensor, device) -> float:
    """Accuracy on 28x28 uint8 images as they are (MNIST's own framing: fast; the app's path is
    checked at the end)."""
    net.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), 1000):
            batch = utils.normalize(images[start : start + 1000]).unsqueeze(1).to(device)
            predicted = net(batch.contiguous(memory_format=torch.channels_last)).argmax(1)
            correct += int((predicted.cpu() == labels[start : start + 1000]).sum())
    net.train()
    return correct / max(1, len(images))


def predicted_digits(
    net: torch.nn.Module, images: Iterable[np.ndarray], batch_size: int = 500
) -> list[int | None]:
    """The digit the app would show for each raw image (None where `preprocess` sees no digit):
    each image through `utils.preprocess`, then `predict_batch` in batches."""
    digits: list[int | None] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        predictions = model_lib.predict_batch(net, torch.cat([batch for _, batch in pending]))
        for (position, _), prediction in zip(pending, predictions, strict=True):
            digits[position] = prediction.digit
        pending.clear()

    for image in images:
        digits.append(None)
        try:
            pending.append((len(digits) - 1, utils.preprocess(image)))
        except utils.EmptyImageError:
            continue
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return digits


def accuracy_report(predicted: Sequence[int | None], labels: Sequence[int]) -> dict:
    """Accuracy overall and per digit, and the most frequent confusions ("7 read as 2", count);
    an image seen as empty counts as wrong."""
    right = [p == t for p, t in zip(predicted, labels, strict=True)]
    totals, correct = Counter(labels), Counter(t for r, t in zip(right, labels, strict=True) if r)
    by_digit = {str(d): round(correct[d] / totals[d], 4) for d in sorted(totals)}
    confusions = Counter(
        f"{t} read as {'nothing' if p is None else p}"
        for p, t in zip(predicted, labels, strict=True)
        if p != t
    )
    return {
        "accuracy": sum(right) / max(1, len(right)),
        "count": len(right),
        "by_digit": by_digit,
        "confusions": dict(confusions.most_common(5)),
    }


def write_model(net, args, metrics: dict, trained_seconds: float, started: float) -> dict:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in (args.out.name, args.out.with_suffix(".json").name):
        for stale in args.out.parent.glob(f".{name}.*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    atomic_save(net.state_dict(), args.out)
    _, peak = memory_mb()
    info = {
        "test_accuracy": round(metrics["test_accuracy"], 5),
        **({"pen_held_out": metrics["pen_held_out"]} if "pen_held_out" in metrics else {}),
        "measured_through": "utils.preprocess + model.predict_batch",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "sources": list(args.sources),
        "pen_share": args.pen_share if set(args.sources) == set(SOURCES) else None,
        "pen_views": args.pen_views,
        "training_images": metrics["training_images"],
        "training_seconds": round(trained_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in net.parameters()),
        "torch_version": torch.__version__,
    }
    atomic_write_text(json.dumps(info, indent=2) + "\n", args.out.with_suffix(".json"))
    log.info("model saved to %s (%s)", args.out, args.out.with_suffix(".json"))
    return info


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    sys.stdout.reconfigure(line_buffering=True)
    args = parse_args(argv)
    stop = StopFlag()
    stop.install()
    try:
        train(args, stop)
    except StopRequested:
        return EXIT_TERMINATED
    except (mnist.DatasetError, SetupError) as exc:
        log.error("training stopped: %s", exc)
        return EXIT_BAD_INPUT
    except BaseException:
        log.exception(
            "training crashed; the newest checkpoint in %s is kept: run the same command to resume",
            args.checkpoint_dir,
        )
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
