"""Train the digit CNN on MNIST, checkpointing every epoch so that no crash loses progress.

    python train.py --download          # full run with the defaults: a few minutes on 2 CPU cores
    python train.py --limit 2000 --epochs 2 --out /tmp/m.pth --checkpoint-dir /tmp/ckpt

Kill it at any moment (SIGKILL, OOM, power loss) and run the same command again: it resumes from
the newest checkpoint that loads. SIGTERM or Ctrl-C (what `docker stop` sends) saves a checkpoint
of the epoch in progress first, then exits with code 143.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import augment
import evaluate
import mnist
import utils
from model import DigitCNN

log = logging.getLogger("train")

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_TERMINATED = 143
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-e(\d{4})-s(\d{6})\.pt$")
# Settings a checkpoint must share with the current run to be resumed by it.
RUN_SETTINGS = ("epochs", "batch_size", "lr", "seed", "limit")


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
    parser.add_argument("--download", action="store_true", help="fetch MNIST if it is missing")
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
    parser.add_argument("--drawn", type=int, default=2000, help="size of each drawn set")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.keep < 1:
        parser.error("--epochs, --batch-size and --keep must be >= 1 and --lr > 0")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    return args


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
    """torch.save to a temporary file, fsync, then rename: the file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        if state.get("settings") != settings:
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


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a function of the seed, so a resume can replay it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


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

    if args.download:
        mnist.download(args.data_dir)
    train_images, train_labels = mnist.load_split(args.data_dir, "train")
    test_images, test_labels = mnist.load_split(args.data_dir, "test")
    if args.limit:
        train_images, train_labels = train_images[: args.limit], train_labels[: args.limit]
        test_images, test_labels = test_images[: args.limit], test_labels[: args.limit]
    log.info(
        "data: %d training and %d test images from %s",
        len(train_images),
        len(test_images),
        args.data_dir,
    )

    net = DigitCNN().to(device).to(memory_format=torch.channels_last)
    steps_per_epoch = -(-len(train_images) // args.batch_size)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
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

    dataset = TensorDataset(train_images, train_labels)
    session_start = time.perf_counter()
    progress = Progress(epoch=first_epoch, step=first_step)
    try:
        for epoch in range(first_epoch, args.epochs):
            progress.epoch = epoch
            order = epoch_order(len(dataset), args.seed, epoch)[progress.step * args.batch_size :]
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
            test_accuracy = mnist_accuracy(net, test_images, test_labels, device)
            rss, peak = memory_mb()
            history.append({"epoch": epoch + 1, "test_accuracy": test_accuracy})
            log.info(
                "epoch %d/%d done: test accuracy %.2f%%, lr %.4f, rss %.0f MB (peak %.0f MB), "
                "%.0f s so far",
                epoch + 1,
                args.epochs,
                100 * test_accuracy,
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
    metrics = evaluate.evaluate(
        net.cpu(), test_images, test_labels, drawn_count=args.drawn, log=log.info
    )
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


def mnist_accuracy(net, images: torch.Tensor, labels: torch.Tensor, device) -> float:
    """Accuracy on MNIST's own 28x28 framing (fast; the app's path is checked at the end)."""
    net.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), 1000):
            batch = utils.normalize(images[start : start + 1000]).unsqueeze(1).to(device)
            predicted = net(batch.contiguous(memory_format=torch.channels_last)).argmax(1)
            correct += int((predicted.cpu() == labels[start : start + 1000]).sum())
    net.train()
    return correct / max(1, len(images))


def write_model(net, args, metrics: dict, trained_seconds: float, started: float) -> dict:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in (args.out.name, args.out.with_suffix(".json").name):
        for stale in args.out.parent.glob(f".{name}.*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    atomic_save(net.state_dict(), args.out)
    _, peak = memory_mb()
    info = {
        "test_accuracy": round(metrics["test_accuracy"], 5),
        "drawn_accuracy": round(metrics["drawn_accuracy"], 5),
        "drawn_accuracy_by_style": {
            style: round(value, 4) for style, value in metrics["drawn_accuracy_by_style"].items()
        },
        "pen_accuracy": round(metrics["pen_accuracy"], 5),
        "styles_accuracy": round(metrics["styles_accuracy"], 5),
        "measured_through": "utils.preprocess + model.predict_batch",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "training_images": args.limit or 60000,
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
