"""Train the digit CNN on MNIST, real pen handwriting and the app's own answered drawings, then
the model of their strokes beside it, checkpointing every epoch so that no crash loses progress.

    python train.py --download          # full run with the defaults: minutes on 2 CPU cores
    python train.py --limit 2000 --epochs 2 --out /tmp/m.pth --checkpoint-dir /tmp/ckpt
    python train.py --sources mnist     # MNIST alone, as before pen digits
    python train.py --sources mnist,pen,feedback --init models/model.pth --promote
                                        # fine-tune the live model on people's drawings too
                                        # (--init: the fine-tune defaults, FINE_TUNE)

First `--epochs` epochs of the image CNN, then `--trajectory-epochs` epochs of the trajectory
model (model.TrajectoryNet) on the strokes of the pen digits and people's drawings, each epoch
written and placed anew (`trajectory_inputs`). The data comes from `sources.py`. The held-out
part of each source (pen writers, a fifth of the people's drawings) is never trained on; the
model's accuracy on it, per digit and with its worst confusions, goes to the log and to
model.json. With `--promote`, the new model replaces the live
one only if `versions.promote` finds it better (exit code versions.EXIT_REFUSED otherwise).

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
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import augment
import db
import mnist
import model as model_lib
import pendigits
import sources
import utils
from files import atomic_file
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
    "feedback_share", "feedback_views", "init", "epoch_size", "freeze_bn",
    "distill", "members", "stroke_variation", "trajectory_epochs",
)  # fmt: skip
# What a checkpoint from before a setting existed was trained with.
OLD_SETTINGS = {"members": 1, "trajectory_epochs": 0}
SOURCES = sources.NAMES
FEEDBACK_SHARE = 0.3  # measured: README, Training (simulated people)
# From scratch: --epochs, --lr, --epoch-size. A fine-tune (--init, the feedback loop's run) has
# its own defaults, measured with `python -m lab.evaluate --simulate-people` (README, Training).
SCRATCH = {
    "epochs": 12, "lr": 0.05, "epoch_size": None, "pen_share": 0.4, "feedback_views": 8,
    "distill": 0.0, "trajectory_epochs": 40,
}  # fmt: skip
# A fine-tune keeps --init's trajectory model as it is unless --trajectory-epochs says more.
FINE_TUNE = {
    "epochs": 2, "lr": 0.005, "epoch_size": 20_000, "pen_share": 0.2, "feedback_views": 16,
    "distill": 0.0, "trajectory_epochs": 0,
}  # fmt: skip
# The trajectory model's training (README, Training: chosen by leave-writers-out CV).
TRAJECTORY_BATCH = 64
TRAJECTORY_LR = 3e-3
TRAJECTORY_STREAM = 7  # its random numbers: a stream of their own, beside the renderings'
DISTILL_T = 2.0  # the temperature of --distill's soft targets
MEMBERS = 1  # from scratch: the ensemble's size (README, Training: --members)
EVAL_BATCH = 500  # images per forward pass when measuring (a whole set at once: 100s of MB)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"passes over the training set (default {SCRATCH['epochs']}; with --init "
        f"{FINE_TUNE['epochs']})",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step")
    parser.add_argument(
        "--lr",
        type=float,
        help=f"peak learning rate, one-cycle (default {SCRATCH['lr']}; with --init "
        f"{FINE_TUNE['lr']})",
    )
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
        help="training data, comma-separated: mnist (scanned paper), pen (pen trajectories), "
        "feedback (the app's answered drawings, from its database: DATABASE_URL, POSTGRES_*)",
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
        help="with both sources, the fraction of each epoch's images that are pen digits, beside "
        f"MNIST (default {SCRATCH['pen_share']}; with --init {FINE_TUNE['pen_share']})",
    )
    parser.add_argument(
        "--pen-views", type=int, default=4, help="renderings of each pen digit, cached"
    )
    parser.add_argument(
        "--stroke-variation",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="pen and feedback renderings written another way now and then: strokes in another "
        "order or direction, pen lifts joined or split, tops open, loops closed "
        "(pendigits.vary_strokes; off: not confirmed by the held-out writers, README)",
    )
    parser.add_argument(
        "--held-out-writers",
        type=_writers,
        default=",".join(map(str, pendigits.HELD_OUT_WRITERS)),
        help="pen writers kept out of training to measure the model on (or 'none')",
    )
    parser.add_argument(
        "--feedback-share",
        type=float,
        default=FEEDBACK_SHARE,
        help="with feedback and another source, the fraction of each epoch's images that are "
        "renderings of the app's drawings (those not held out)",
    )
    parser.add_argument(
        "--feedback-views",
        type=int,
        help=f"renderings of each drawing (default {SCRATCH['feedback_views']}; with --init "
        f"{FINE_TUNE['feedback_views']})",
    )
    parser.add_argument(
        "--members",
        type=int,
        help=f"networks in the ensemble, trained together, each from its own random start; the "
        f"model averages their probabilities (model.DigitCNN; default {MEMBERS}; with --init: "
        f"as many as its file holds)",
    )
    parser.add_argument(
        "--trajectory-epochs",
        type=int,
        help="then passes of the trajectory model (the model of the strokes) over the pen "
        "digits' and people's strokes; 0: none, the image CNN alone (default "
        f"{SCRATCH['trajectory_epochs']} with pen or feedback among --sources; with --init "
        f"{FINE_TUNE['trajectory_epochs']}: its trajectory model kept as it is)",
    )
    parser.add_argument("--init", type=Path, help="start from these weights: fine-tune")
    parser.add_argument(
        "--epoch-size",
        type=int,
        help="images per epoch (default: all MNIST images plus the pen share; with --init "
        f"{FINE_TUNE['epoch_size']:,})",
    )
    parser.add_argument(
        "--distill",
        type=float,
        help="with --init: weight of a distillation loss that keeps the model's answers on the "
        "MNIST and pen images close to the --init model's (learning without forgetting; 0: off)",
    )
    parser.add_argument(
        "--freeze-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep BatchNorm's statistics as they are (default: on with --init, a fine-tune)",
    )
    parser.add_argument("--promote", action="store_true", help="live only if better: versions.py")
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
    asked_trajectory = args.trajectory_epochs
    for name, default in (FINE_TUNE if args.init else SCRATCH).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not {"pen", "feedback"} & set(args.sources):  # MNIST alone: no strokes to learn from
        if asked_trajectory:
            parser.error("--trajectory-epochs needs strokes: pen or feedback among --sources")
        args.trajectory_epochs = 0
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.keep < 1:
        parser.error("--epochs, --batch-size and --keep must be >= 1 and --lr > 0")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.epoch_size is not None and args.epoch_size < 1:
        parser.error("--epoch-size must be >= 1")
    if not 0 < args.pen_share < 1 or args.pen_views < 1:
        parser.error("--pen-share must be between 0 and 1 (exclusive), --pen-views >= 1")
    if not 0 < args.feedback_share < 1 or args.feedback_views < 1:
        parser.error("--feedback-share must be between 0 and 1 (exclusive), --feedback-views >= 1")
    if args.trajectory_epochs < 0:
        parser.error("--trajectory-epochs must be >= 0")
    if args.members is not None and not 1 <= args.members <= model_lib.MAX_MEMBERS:
        parser.error(f"--members must be between 1 and {model_lib.MAX_MEMBERS}")
    if args.distill < 0 or (args.distill and not args.init):
        parser.error("--distill must be >= 0, and needs --init (the model to stay close to)")
    if args.freeze_bn is None:
        args.freeze_bn = args.init is not None
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


def _plain(value: object) -> object:
    """A setting as a checkpoint stores it (lists, not tuples; a path as a string)."""
    if isinstance(value, tuple | Path):
        return list(value) if isinstance(value, tuple) else str(value)
    return value


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
    """torch.save, atomically (files.atomic_file): the file is whole or absent."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def atomic_write_text(text: str, path: Path) -> None:
    with atomic_file(path) as handle:
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
        saved = {**OLD_SETTINGS, **(state.get("settings") or {})}
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


def train(args: argparse.Namespace, stop: StopFlag) -> Trained:
    started = time.perf_counter()
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init:
        load_init(args)  # its members: the checkpoints' settings name them
    args.members = args.members or MEMBERS
    torch.manual_seed(args.seed)
    log.info(
        "torch %s on %s with %d threads; pid %d",
        torch.__version__,
        device,
        torch.get_num_threads(),
        os.getpid(),
    )
    settings = {name: _plain(getattr(args, name)) for name in RUN_SETTINGS}
    if args.fresh:
        log.info("--fresh: ignoring checkpoints in %s", args.checkpoint_dir)
    state = None if args.fresh else load_newest_checkpoint(args.checkpoint_dir, settings)
    # A resume trains on the drawings the interrupted run read, not on those stored since.
    data = sources.load_data(args, feedback_until=state.get("feedback_until") if state else None)
    net, optimizer, scheduler, stroke_optimizer, stroke_scheduler = build(args, data, device, state)
    history, trained_seconds = (state["history"], state["trained_seconds"]) if state else ([], 0)
    progress = Progress(epoch=state["epoch"], step=state["step"]) if state else Progress(0, 0)

    def save_checkpoint(epoch: int, step: int) -> Path:
        path = args.checkpoint_dir / checkpoint_name(epoch, step)
        state = {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **(
                {
                    "trajectory_optimizer": stroke_optimizer.state_dict(),
                    "trajectory_scheduler": stroke_scheduler.state_dict(),
                }
                if stroke_optimizer
                else {}
            ),
            "rng": torch.get_rng_state(),
            "epoch": epoch,
            "step": step,
            "settings": settings,
            "feedback_until": data.feedback_until,
            "history": history,
            "trained_seconds": trained_seconds + time.perf_counter() - session_start,
        }
        atomic_save(state, path)
        prune_checkpoints(args.checkpoint_dir, args.keep)
        return path

    # Which images are people's drawings: --distill keeps the --init model's answers on the rest.
    is_feedback = torch.cat(
        [torch.full((len(s.train.labels),), s.name == "feedback") for s in data.sources]
    )
    dataset = TensorDataset(data.images, data.labels, is_feedback)
    teacher = None
    if args.distill:
        teacher = model_lib.load_model(args.init).to(device).eval()
        teacher = teacher.to(memory_format=torch.channels_last)
    steps_per_epoch = -(-sum(data.per_epoch) // args.batch_size)
    session_start = time.perf_counter()

    def epoch_done(summary: str) -> None:
        """Log the epoch just done (`summary`, then memory and time), checkpoint it."""
        rss, peak = memory_mb()
        seconds = trained_seconds + time.perf_counter() - session_start
        log.info("%s, rss %.0f MB (peak %.0f MB), %.0f s so far", summary, rss, peak, seconds)
        progress.step = 0
        log.info("checkpoint saved: %s", save_checkpoint(progress.epoch + 1, 0))

    try:
        for epoch in range(progress.epoch, args.epochs):
            progress.epoch = epoch
            order = sources.epoch_order(data.sources, data.per_epoch, args.seed, epoch)
            loader = DataLoader(
                dataset,
                batch_size=args.batch_size,
                sampler=order[progress.step * args.batch_size :].tolist(),
                num_workers=args.workers,
                persistent_workers=False,
            )
            train_one_epoch(
                net, loader, optimizer, scheduler, device, args, progress, steps_per_epoch, stop,
                teacher,
            )  # fmt: skip
            history.append(figures := epoch_figures(net, data, device, epoch))
            epoch_done(
                f"epoch {epoch + 1}/{args.epochs} done: test accuracy "
                f"{figures['test_accuracy']:.2%}"
                + "".join(f", {h.title} {figures[f'{h.key}_accuracy']:.2%}" for h in data.held_out)
                + f", lr {scheduler.get_last_lr()[0]:.4f}"
            )
        stroke_labels = torch.tensor([digit.label for digit in data.strokes], dtype=torch.int64)
        last = args.epochs + args.trajectory_epochs
        for epoch in range(max(progress.epoch, args.epochs), last):
            progress.epoch = epoch
            train_trajectory_epoch(
                net.trajectory, data.strokes, stroke_labels, stroke_optimizer, stroke_scheduler,
                device, args, progress, stop,
            )  # fmt: skip
            history.append(figures := trajectory_figures(net, data, device, epoch))
            epoch_done(
                f"trajectory epoch {epoch + 1 - args.epochs}/{args.trajectory_epochs} done"
                + "".join(
                    f", {h.title}: strokes alone {figures[f'{h.key}_strokes_accuracy']:.2%}, "
                    f"with the image {figures[f'{h.key}_accuracy']:.2%}"
                    for h in data.held_out
                    if h.trajectories is not None
                )
                + f", lr {stroke_scheduler.get_last_lr()[0]:.5f}"
            )
    except StopRequested as stopped:
        path = save_checkpoint(progress.epoch, progress.step)
        log.warning(
            "%s received: checkpoint of epoch %d step %d saved to %s (epochs after %d: the "
            "trajectory model's); run the same command to resume",
            stopped,
            progress.epoch + 1,
            progress.step,
            path,
            args.epochs,
        )
        raise

    trained_seconds += time.perf_counter() - session_start
    log.info("training done in %.0f s; evaluating through utils.preprocess", trained_seconds)
    net = net.to(memory_format=torch.contiguous_format).eval().cpu()
    metrics = final_figures(net, data)
    out = candidate_path(args) if args.promote else args.out
    info = write_model(net, args, data, metrics, trained_seconds, started, out)
    return Trained(out, info, data)


def build(args: argparse.Namespace, data: sources.Data, device, state: dict | None):
    """The network, its optimizer and learning-rate schedule, and the trajectory model's (None
    without --trajectory-epochs): as the checkpoint `state` left them, or new (the network from
    --init's weights if given; a trajectory model added if it has none and one is to be
    trained)."""
    if args.trajectory_epochs and not data.strokes:
        raise SetupError("--trajectory-epochs: no strokes to learn from (no pen digits)")
    if state:
        net = DigitCNN(args.members, trajectory=model_lib.TRAJECTORY_KEY in state["model"])
    elif args.init:
        net = load_init(args)
        log.info("starting from the weights in %s (%d members)", args.init, args.members)
    else:
        net = DigitCNN(members=args.members)
    if args.trajectory_epochs and net.trajectory is None:
        net.add_trajectory()
    net = net.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        net.members.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=args.lr,
        epochs=args.epochs,
        steps_per_epoch=-(-sum(data.per_epoch) // args.batch_size),
    )
    stroke_optimizer = stroke_scheduler = None
    if args.trajectory_epochs:
        stroke_optimizer = torch.optim.AdamW(
            net.trajectory.parameters(), lr=TRAJECTORY_LR, weight_decay=1e-4
        )
        stroke_scheduler = torch.optim.lr_scheduler.OneCycleLR(
            stroke_optimizer,
            max_lr=TRAJECTORY_LR,
            epochs=args.trajectory_epochs,
            steps_per_epoch=-(-len(data.strokes) // TRAJECTORY_BATCH),
        )
    if state:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if stroke_optimizer:
            stroke_optimizer.load_state_dict(state["trajectory_optimizer"])
            stroke_scheduler.load_state_dict(state["trajectory_scheduler"])
        torch.set_rng_state(state["rng"])
        log.info(
            "resuming from epoch %d step %d (%s): continuing with epoch %d/%d",
            state["epoch"],
            state["step"],
            state["path"].name,
            state["epoch"] + 1,
            args.epochs,
        )
    elif not args.fresh:
        log.info("no checkpoint in %s: starting from scratch", args.checkpoint_dir)
    return net, optimizer, scheduler, stroke_optimizer, stroke_scheduler


def load_init(args: argparse.Namespace) -> DigitCNN:
    """--init's model; sets --members to its members (a fine-tune trains them all)."""
    try:
        net = model_lib.load_model(args.init)
    except model_lib.ModelLoadError as exc:
        raise SetupError(f"--init {args.init}: {exc}") from exc
    if args.members not in (None, len(net.members)):
        raise SetupError(
            f"--init {args.init} holds {len(net.members)} members, not --members {args.members}:"
            f" leave --members out to fine-tune them all"
        )
    args.members = len(net.members)
    return net


@dataclass
class Trained:
    path: Path  # the weights written
    info: dict  # what model.json says about them
    data: sources.Data


def epoch_figures(net, data: sources.Data, device, epoch: int) -> dict:
    """Accuracy on MNIST's test set and each held-out part after an epoch (fast: the 28x28
    images as they are; the app's path is measured at the end)."""
    figures = {"epoch": epoch + 1, "test_accuracy": pixels_accuracy(net, data.test, device)}
    for held in data.held_out:
        figures[f"{held.key}_accuracy"] = pixels_accuracy(net, held, device)
    return figures


def final_figures(net, data: sources.Data) -> dict:
    """MNIST's test set through utils.preprocess (the app's path) and each held-out part, per
    digit and with its worst confusions, logged and returned for model.json."""
    found = predictions(net, (image.numpy() for image in data.test.images))
    test = accuracy_report(
        [p and p.digit for p in found],
        data.test.labels.tolist(),
        [p.confidence if p else 0.0 for p in found],
    )
    log.info(
        "MNIST test set: %.2f%% of %d, expected calibration error %.2f%%",
        100 * test["accuracy"],
        len(data.test),
        100 * test["ece"],
    )
    metrics = {"test_accuracy": test["accuracy"], "test_ece": test["ece"]}
    for held in data.held_out:
        # Held-out images went through utils.preprocess already, their strokes through
        # utils.trajectory: this is the app's path.
        images = utils.normalize(held.images)[:, None]
        report = held_out_report(net, images, held)
        if held.trajectories is not None and net.trajectory is not None:
            alone = held_out_report(net, images, held, strokes=False)
            report["image_alone"] = {k: alone[k] for k in ("accuracy", "ece", "by_digit")}
        log.info(
            "%s: %.2f%% of %d, expected calibration error %.2f%%; by digit %s; worst confusions %s",
            held.title,
            100 * report["accuracy"],
            len(held),
            100 * report["ece"],
            " ".join(f"{d}:{a:.1%}" for d, a in report["by_digit"].items()),
            ", ".join(f"{c} x{n}" for c, n in report["confusions"].items()) or "none",
        )
        metrics[held.key] = {**held.about, **report}
    return metrics


def held_out_report(net, images: torch.Tensor, held: sources.HeldOut, strokes: bool = True):
    """`accuracy_report` of the app's answers on a held-out part (from its images alone, if
    not `strokes` or its strokes are unknown)."""
    predicted = []
    for start in range(0, len(images), EVAL_BATCH):  # a whole set at once: hundreds of MB
        part = slice(start, start + EVAL_BATCH)
        paths = held.trajectories[part] if strokes and held.trajectories is not None else None
        predicted += model_lib.predict_batch(net, images[part], paths)
    return accuracy_report(
        [p.digit for p in predicted], held.labels.tolist(), [p.confidence for p in predicted]
    )


def candidate_path(args: argparse.Namespace) -> Path:
    """Where --promote keeps the new model until promotion decides (the live one stays)."""
    return args.checkpoint_dir / f"candidate{args.out.suffix}"


def promote(args: argparse.Namespace, trained: Trained) -> int:
    """Hand the candidate to versions.promote with the sets to compare it on; the exit code."""
    try:
        import registry.promotion  # only here: training without --promote needs no registry
    except ImportError as exc:
        raise SetupError(f"--promote needs versions.py, the model registry ({exc})") from exc

    data = trained.data
    held_feedback = next((h for h in data.held_out if h.key == "feedback_held_out"), None)
    if held_feedback is None:  # trained without feedback: its held-out part is still the test
        try:
            conninfo = db.resolve_conninfo(owner=True)
            held_feedback = sources.feedback_held_out(sources.read_feedback(conninfo))
        except sources.FeedbackError as exc:
            log.warning("no held-out feedback to compare on: %s", exc)
            held_feedback = sources.feedback_held_out([])
    held_pen = next((h for h in data.held_out if h.key == "pen_held_out"), None)
    held_pen = held_pen or sources.pen_held_out(args) or sources.Images.empty()

    def eval_set(images: sources.Images, primary: bool = False):
        return registry.promotion.EvalSet(
            utils.normalize(images.images)[:, None],
            images.labels,
            primary,
            getattr(images, "trajectories", None),
        )

    eval_sets = {
        "held-out feedback": eval_set(held_feedback, primary=True),
        "MNIST test": eval_set(data.test),
        "held-out pen writers": eval_set(held_pen),
    }
    result = registry.promotion.promote(
        trained.path,
        trained.info,
        eval_sets,
        conninfo=db.resolve_conninfo(owner=True),
        out=args.out,
    )
    log.info("promotion:\n%s", result.table)
    if not result.promoted:
        log.warning(
            "not promoted: the live model (%s) stays; the candidate is %s",
            str(result.live_sha256)[:12],
            trained.path,
        )
        return registry.promotion.EXIT_REFUSED
    atomic_write_text(json.dumps(trained.info, indent=2) + "\n", args.out.with_suffix(".json"))
    log.info("promoted %s: now live, and in %s", str(result.candidate_sha256)[:12], args.out)
    return 0


@dataclass
class Progress:
    """Where training is: `epoch` epochs complete, `step` steps of the next one done."""

    epoch: int
    step: int


def train_one_epoch(
    net,
    loader,
    optimizer,
    scheduler,
    device,
    args,
    progress: Progress,
    steps_per_epoch,
    stop,
    teacher=None,
) -> None:
    """Train from `progress.step` to the end of epoch `progress.epoch`, counting steps."""
    epoch = progress.epoch
    net.train()
    if args.freeze_bn:  # a fine-tune: the live model's BatchNorm statistics, not this batch's
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    last_log = time.perf_counter()
    samples, loss_sum, correct = 0, 0.0, 0
    for images, labels, feedback in loader:
        stop.check()
        images = images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
        labels = labels.to(device, non_blocking=True)
        images = augment.augment(augment.flag_ones(images, labels))
        inputs = images.sub_(utils.MNIST_MEAN).div_(utils.MNIST_STD)
        inputs = inputs.contiguous(memory_format=torch.channels_last)

        member_logits = net.member_logits(inputs)  # each member learns on its own: losses summed
        loss = sum(F.cross_entropy(logits, labels) for logits in member_logits)
        logits = model_lib.combine(member_logits)  # the ensemble's answer, as predict reads it
        if teacher is not None and (kept := ~feedback.to(device)).any():
            with torch.no_grad():
                target = F.log_softmax(teacher(inputs[kept]) / DISTILL_T, 1)
            student = F.log_softmax(logits[kept] / DISTILL_T, 1)
            kl = F.kl_div(student, target, reduction="batchmean", log_target=True)
            loss = loss + args.distill * DISTILL_T**2 * kl * kept.float().mean()
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


def trajectory_inputs(digits: Sequence[pendigits.PenDigit], seed: int, epoch: int) -> torch.Tensor:
    """The trajectory model's inputs for one epoch, (N, 5, points): each digit's strokes as
    another person might write them (`pendigits.vary_strokes`: order, direction, pen lifts,
    open tops, closed loops), placed on the canvas as another person or device might
    (`pendigits.on_canvas`: slant, rotation, stretch, each stroke a little off, tremor), then
    read as the app reads a drawing (`utils.trajectory_features`). Digit i of epoch e depends
    only on (seed, e, i): a resumed epoch is the same."""
    out = np.empty((len(digits), utils.TRAJECTORY_FEATURES, utils.TRAJECTORY_POINTS), np.float32)
    for i, digit in enumerate(digits):
        rng = np.random.default_rng((seed, epoch, i, TRAJECTORY_STREAM))
        lines, _ = pendigits.on_canvas(
            pendigits.vary_strokes(digit.strokes, digit.label, rng), rng, vary=True
        )
        out[i] = utils.trajectory_features(lines)
    return torch.from_numpy(out)


def train_trajectory_epoch(
    net: model_lib.TrajectoryNet,
    digits: Sequence[pendigits.PenDigit],
    labels: torch.Tensor,
    optimizer,
    scheduler,
    device,
    args,
    progress: Progress,
    stop,
) -> None:
    """Train the trajectory model `net` on `digits` from `progress.step` to the end of epoch
    `progress.epoch` (counted after the CNN's `args.epochs`), counting steps."""
    epoch = progress.epoch - args.epochs
    inputs = trajectory_inputs(digits, args.seed, epoch)
    order = torch.from_numpy(np.random.default_rng((args.seed, epoch)).permutation(len(digits)))
    steps = -(-len(digits) // TRAJECTORY_BATCH)
    net.train()
    last_log = time.perf_counter()
    samples, loss_sum, correct = 0, 0.0, 0
    for step in range(progress.step, steps):
        stop.check()
        batch = order[step * TRAJECTORY_BATCH : (step + 1) * TRAJECTORY_BATCH]
        target = labels[batch].to(device)
        logits = net(inputs[batch].to(device))
        loss = F.cross_entropy(logits, target, label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.step = step + 1
        samples += len(batch)
        loss_sum += loss.item() * len(batch)
        correct += int((logits.argmax(1) == target).sum())
        now = time.perf_counter()
        if now - last_log >= args.log_every or progress.step == steps:
            log.info(
                "trajectory epoch %d/%d step %d/%d loss %.4f acc %.2f%% %.0f samples/s rss %.0f MB",
                epoch + 1,
                args.trajectory_epochs,
                progress.step,
                steps,
                loss_sum / samples,
                100 * correct / samples,
                samples / (now - last_log),
                memory_mb()[0],
            )
            last_log, samples, loss_sum, correct = now, 0, 0.0, 0


def trajectory_figures(net, data: sources.Data, device, epoch: int) -> dict:
    """After a trajectory epoch, on each held-out part whose strokes are known: the accuracy of
    the trajectory model alone and of the app's answer (both models)."""
    figures = {"epoch": epoch + 1}
    net.eval()
    for held in data.held_out:
        if held.trajectories is None:
            continue
        alone, both = [], []
        for start in range(0, len(held), EVAL_BATCH):
            strokes = held.trajectories[start : start + EVAL_BATCH].to(device)
            images = utils.normalize(held.images[start : start + EVAL_BATCH])[:, None].to(device)
            with torch.inference_mode():
                alone.append(net.trajectory(strokes).argmax(1).cpu())
                images = images.contiguous(memory_format=torch.channels_last)
                both.append(net(images, strokes).argmax(1).cpu())
        for name, found in (("strokes_accuracy", alone), ("accuracy", both)):
            figures[f"{held.key}_{name}"] = float((torch.cat(found) == held.labels).float().mean())
    return figures


def pixels_accuracy(net, images: sources.Images, device) -> float:
    """Accuracy on 28x28 uint8 images as they are (MNIST's own framing: fast; the app's path is
    checked at the end)."""
    net.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), 1000):
            batch = utils.normalize(images.images[start : start + 1000]).unsqueeze(1).to(device)
            predicted = net(batch.contiguous(memory_format=torch.channels_last)).argmax(1)
            correct += int((predicted.cpu() == images.labels[start : start + 1000]).sum())
    net.train()
    return correct / max(1, len(images))


def predicted_digits(
    net: torch.nn.Module, images: Iterable[np.ndarray], batch_size: int = 500
) -> list[int | None]:
    """The digit the app would show for each raw image (None where `preprocess` sees no digit):
    each image through `utils.preprocess`, then `predict_batch` in batches."""
    return [p and p.digit for p in predictions(net, images, batch_size)]


def predictions(
    net: torch.nn.Module, images: Iterable[np.ndarray], batch_size: int = 500
) -> list[model_lib.Prediction | None]:
    """What the app would show for each raw image, digit and confidence (None where
    `preprocess` sees no digit): each image through `utils.preprocess`, then `predict_batch`."""
    return read_drawings(net, ((image, None) for image in images), batch_size)


def read_drawings(
    net: torch.nn.Module, drawings: Iterable[tuple[np.ndarray, object]], batch_size: int = 500
) -> list[model_lib.Prediction | None]:
    """`predictions` of (image, strokes) pairs, each read as the app reads a drawing: its image
    through `utils.preprocess`, its strokes (canvas pixels, y down; None: unknown) through
    `utils.trajectory`, then `predict_batch` (a batch with any strokes unknown: the images
    alone)."""
    found: list[model_lib.Prediction | None] = []
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    def flush() -> None:
        paths = [path for _, _, path in pending]
        trajectories = torch.cat(paths) if all(p is not None for p in paths) else None
        images = torch.cat([image for _, image, _ in pending])
        for (position, _, _), prediction in zip(
            pending, model_lib.predict_batch(net, images, trajectories), strict=True
        ):
            found[position] = prediction
        pending.clear()

    for image, strokes in drawings:
        found.append(None)
        try:
            model_input = utils.preprocess(image)
        except utils.EmptyImageError:
            continue
        path = utils.trajectory(strokes) if strokes is not None else None
        pending.append((len(found) - 1, model_input, path))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return found


def expected_calibration_error(
    confidences: Sequence[float], right: Sequence[bool], bins: int = 15
) -> float:
    """Expected calibration error: the confidences cut into `bins` equal-width bins ((0, 1/15],
    (1/15, 2/15], ...), each bin's |accuracy - mean confidence| weighted by its share of the
    images (Naeini et al., 2015; Guo et al., 2017, with 15 bins)."""
    confidence = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(right, dtype=np.float64)
    if not len(confidence):
        return 0.0
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    gaps = [
        (which == b).sum() * abs(correct[which == b].mean() - confidence[which == b].mean())
        for b in np.unique(which)
    ]
    return float(sum(gaps) / len(confidence))


def accuracy_report(
    predicted: Sequence[int | None],
    labels: Sequence[int],
    confidences: Sequence[float] | None = None,
) -> dict:
    """Accuracy overall and per digit, and the most frequent confusions ("7 read as 2", count);
    an image seen as empty counts as wrong. With the `confidences` shown (0 for an image seen
    as empty), also the expected calibration error (`ece`)."""
    right = [p == t for p, t in zip(predicted, labels, strict=True)]
    totals, correct = Counter(labels), Counter(t for r, t in zip(right, labels, strict=True) if r)
    by_digit = {str(d): round(correct[d] / totals[d], 4) for d in sorted(totals)}
    confusions = Counter(
        f"{t} read as {'nothing' if p is None else p}"
        for p, t in zip(predicted, labels, strict=True)
        if p != t
    )
    calibration = (
        {"ece": round(expected_calibration_error(confidences, right), 5)}
        if confidences is not None
        else {}
    )
    return {
        "accuracy": sum(right) / max(1, len(right)),
        "count": len(right),
        "by_digit": by_digit,
        "confusions": dict(confusions.most_common(5)),
        **calibration,
    }


def write_model(
    net, args, data: sources.Data, metrics: dict, trained_seconds: float, started: float, out: Path
) -> dict:
    """The weights to `out` and what they are (how trained, on what, their figures) to
    `out`.json: model.json."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in (out.name, out.with_suffix(".json").name):
        for stale in out.parent.glob(f".{name}.*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    atomic_save(net.state_dict(), out)
    _, peak = memory_mb()
    names = [source.name for source in data.sources]
    info = {
        "test_accuracy": round(metrics["test_accuracy"], 5),
        "test_ece": metrics.get("test_ece"),
        **{held.key: metrics[held.key] for held in data.held_out},
        "measured_through": "utils.preprocess"
        + (" + utils.trajectory" if net.trajectory is not None else "")
        + " + model.predict_batch",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "init": str(args.init) if args.init else None,
        "epoch_size": args.epoch_size,
        "freeze_bn": args.freeze_bn,
        "distill": args.distill,
        "members": len(net.members),
        "trajectory_model": net.trajectory is not None,
        "trajectory_epochs": args.trajectory_epochs,
        "sources": names,
        "pen_share": args.pen_share if {"mnist", "pen"} <= set(names) else None,
        "pen_views": args.pen_views,
        "stroke_variation": args.stroke_variation,
        **(
            {
                "feedback_share": args.feedback_share if len(names) > 1 else None,
                "feedback_views": args.feedback_views,
                "feedback_rows_through_id": data.feedback_until,
            }
            if "feedback" in names
            else {}
        ),
        "training_images": {source.name: len(source.train) for source in data.sources},
        "training_seconds": round(trained_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in net.parameters()),
        "torch_version": torch.__version__,
    }
    atomic_write_text(json.dumps(info, indent=2) + "\n", out.with_suffix(".json"))
    log.info("model saved to %s (%s)", out, out.with_suffix(".json"))
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
        trained = train(args, stop)
        return promote(args, trained) if args.promote else 0
    except StopRequested:
        return EXIT_TERMINATED
    except (mnist.DatasetError, SetupError, db.DatabaseUnavailable) as exc:
        log.error("training stopped: %s", exc)
        return EXIT_BAD_INPUT
    except BaseException:
        log.exception(
            "training crashed; the newest checkpoint in %s is kept: run the same command to resume",
            args.checkpoint_dir,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
