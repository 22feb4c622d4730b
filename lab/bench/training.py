"""Training: seconds per epoch and peak memory of train.py with its default settings.

By default one epoch is measured (``train.py --epochs 1``, every other setting default: MNIST's
60,000 images and the pen digits, the default batch size, all cores) and the default run is
extrapolated from it; ``--training full`` runs the real default training. Both include the data
preparation (drawing the pen digits). Peak memory is also measured with ``--workers 2`` (one
epoch): the main process plus its DataLoader workers.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.bench.common import ROOT, Row, at_most, child_env, mnist_dir

SECTION = "Training"
# Issue 12: the default run, data preparation included, on 2 cores; its peak memory.
TOTAL_LIMIT_S = 600
RSS_LIMIT_MB = 1024
DONE = re.compile(r"epoch (\d+)/(\d+) done")
DREW = re.compile(r"drew (\d+) pen renderings in (\d+) s")


@dataclass
class TrainRun:
    returncode: int
    seconds: float
    lines: list[tuple[float, str]]  # (seconds since start, line)
    peak_main_mb: float  # VmHWM of the train.py process
    peak_tree_mb: float  # highest sum of RSS over train.py and its children (sampled)
    threads: int | None = None
    epoch_ends: list[float] = field(default_factory=list)
    images_per_epoch: str = ""

    def first(self, text: str) -> float:
        return next(t for t, line in self.lines if text in line)


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


def run_train(data: Path, pen_file: Path, *extra: str, timeout: float = 1800) -> TrainRun:
    """Run train.py (defaults plus *extra*) in a temporary folder, sampling its memory."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        command = [
            sys.executable, str(ROOT / "train.py"),
            "--data-dir", str(data),
            "--pen-file", str(pen_file),
            "--out", f"{tmp}/model.pth",
            "--checkpoint-dir", f"{tmp}/checkpoints",
            *extra,
        ]  # fmt: skip
        lines: list[tuple[float, str]] = []
        start = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append((time.perf_counter() - start, line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        peak_main = peak_tree = 0
        while process.poll() is None:
            if time.perf_counter() - start > timeout:
                process.kill()
                raise RuntimeError(f"train.py took more than {timeout} s")
            peak_main = max(peak_main, _status_kb(process.pid, "VmHWM"))
            tree = [process.pid, *_children(process.pid)]
            peak_tree = max(peak_tree, sum(_status_kb(pid, "VmRSS") for pid in tree))
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        reader.join(10)
    result = TrainRun(process.returncode, seconds, lines, peak_main / 1024, peak_tree / 1024)
    if result.returncode != 0:
        tail = "\n".join(line for _, line in lines[-20:])
        raise RuntimeError(f"train.py {' '.join(extra)} failed ({result.returncode}):\n{tail}")
    for t, line in lines:
        if DONE.search(line):
            result.epoch_ends.append(t)
        if m := re.search(r"with (\d+) threads", line):
            result.threads = int(m.group(1))
        if m := re.search(r"data: (\d+) images per epoch \((.*)\)", line):
            result.images_per_epoch = f"{int(m.group(1)):,} images per epoch ({m.group(2)})"
    return result


def train_defaults() -> tuple[int, int]:
    """train.py's default epochs and batch size: TrainConfig's (a run from scratch)."""
    from training.config import TrainConfig

    defaults = TrainConfig()
    return defaults.epochs, defaults.batch_size


def run(mode: str = "epoch") -> list[Row]:
    if mode not in ("epoch", "full"):
        raise ValueError(f"training mode must be 'epoch' or 'full', not {mode!r}")
    import pendigits

    epochs, batch = train_defaults()
    data = mnist_dir()
    if data is None:
        return [Row(SECTION, "training", None, "", note="skipped: no MNIST (set MNIST_DIR)")]
    pen_file = pendigits.default_path()
    pen_file = pen_file if pen_file.is_absolute() else ROOT / pen_file
    if not pen_file.is_file():
        note = f"skipped: no {pen_file} (set PENDIGITS_DIR)"
        return [Row(SECTION, "training", None, "", note=note)]
    rows = []
    if mode == "full":
        full = run_train(data, pen_file)
        begin = full.first("starting from scratch")
        ends = [begin, *full.epoch_ends]
        per_epoch = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        rows += [
            Row(SECTION, f"seconds per epoch (mean of {epochs}, default run)",
                sum(per_epoch) / len(per_epoch), "s",
                note=f"min {min(per_epoch):.1f}, max {max(per_epoch):.1f}; "
                f"{full.threads} threads; {full.images_per_epoch}, batch {batch}"),
            _drawing_row(full),
            at_most(SECTION, "default training, total (measured)", full.seconds, "s", TOTAL_LIMIT_S,
                note=f"python train.py: {epochs} epochs + final evaluation, process start to exit"),
            at_most(SECTION, "peak RSS, default run (--workers 0)", full.peak_main_mb, "MB",
                RSS_LIMIT_MB, note="VmHWM of the train.py process"),
        ]  # fmt: skip
    else:
        one = run_train(data, pen_file, "--epochs", "1")
        begin = one.first("starting from scratch")
        epoch = one.epoch_ends[0] - begin
        tail = one.seconds - one.epoch_ends[0]
        total = begin + epochs * epoch + tail
        rows += [
            Row(SECTION, "seconds per epoch (1 epoch measured)", epoch, "s",
                note=f"train.py --epochs 1, other settings default: {one.threads} threads, "
                f"{one.images_per_epoch}, batch {batch}"),
            _drawing_row(one),
            at_most(SECTION, "default training, total (EXTRAPOLATED)", total, "s", TOTAL_LIMIT_S,
                note=f"start-up and data {begin:.1f} s + {epochs} x epoch + final evaluation "
                f"{tail:.1f} s; "
                "`python -m lab.bench --training full` measures it"),
            at_most(SECTION, "peak RSS, default settings (--workers 0)", one.peak_main_mb, "MB",
                RSS_LIMIT_MB, note="VmHWM of train.py over 1 epoch + final evaluation"),
        ]  # fmt: skip
    workers = run_train(data, pen_file, "--epochs", "1", "--workers", "2")
    worker_epoch = workers.epoch_ends[0] - workers.first("starting from scratch")
    rows += [
        Row(SECTION, "peak RSS with --workers 2 (main + workers)", workers.peak_tree_mb, "MB",
            note=f"sum of VmRSS sampled every 0.1 s (shared pages counted per process); "
            f"main process alone {workers.peak_main_mb:.0f} MB; 1 epoch {worker_epoch:.1f} s"),
    ]  # fmt: skip
    return rows


def _drawing_row(result: TrainRun) -> Row:
    """Data preparation: the seconds train.py took to draw the pen digits (both sets)."""
    drawn = [
        (int(m.group(1)), int(m.group(2))) for _, line in result.lines if (m := DREW.search(line))
    ]
    return Row(SECTION, "data preparation: drawing the pen digits", sum(s for _, s in drawn), "s",
               note=f"{sum(n for n, _ in drawn):,} renderings through utils.preprocess, "
               "cached in the checkpoint folder for a resume")  # fmt: skip
