"""Fault drills with real processes: training killed at random moments, bad images, and (marked
``browser``) the database failing under a real ``streamlit run`` app, and 8 users at once.

Each drill prints what it did (run pytest with ``-s`` to see it). The random moments of the
training drill come from a seed printed at the start; ``DRILL_SEED=<seed>`` replays them.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from mnist_files import copy_subset
from PIL import Image

import model
import train

ROOT = Path(__file__).resolve().parent.parent


# --- training: SIGKILL at three random moments ---------------------------------------------------

EPOCHS = 3
STEPS = 16  # 2,000 images / batch 128
DONE_RE = re.compile(r"epoch (\d+)/3 done")
SAVED_RE = re.compile(r"checkpoint saved: .*checkpoint-e(\d{4})-s(\d{6})\.pt")
RESUME_RE = re.compile(r"resuming from epoch (\d+) step (\d+)")


class TrainRun:
    """train.py as a child process whose output is read line by line as it comes."""

    def __init__(self, command: list[str], log: Path):
        self.lines: list[str] = []
        self.log = log
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.log.open("w") as log:
            for line in self.process.stdout:
                log.write(line)
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 240) -> bool:
        """Wait for a line matching *pattern*; False if the process ended without one."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return True
                seen = len(self.lines)
                if not self._reader.is_alive():
                    return False
                if time.monotonic() > deadline:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s")
                self._changed.wait(0.5)

    def kill(self) -> bool:
        """SIGKILL; False if the process had already exited."""
        alive = self.process.poll() is None
        if alive:
            self.process.send_signal(signal.SIGKILL)
        self.finish()
        return alive

    def finish(self, timeout: float = 300) -> int:
        self.process.wait(timeout)
        self._reader.join(30)
        return self.process.returncode

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class RunRecord:
    """What one run logged, and what its kill left on disk."""

    resumed_from: int  # epochs complete when it started (0: from scratch)
    done: list[int]  # epochs it logged "done", in order
    saved: list[int]  # epochs whose checkpoint it logged "saved"
    newest_on_disk: int = 0  # after the run: the newest checkpoint's epoch (0: none)
    moment: str = ""
    killed: bool = False
    returncode: int | None = None
    leftovers: list[str] = field(default_factory=list)


def parse_run(text: str) -> RunRecord:
    if "starting from scratch" in text:
        resumed_from = 0
    else:
        match = RESUME_RE.search(text)
        assert match, f"neither a fresh start nor a resume:\n{text[-3000:]}"
        assert match.group(2) == "0", "SIGKILL can leave no mid-epoch checkpoint"
        resumed_from = int(match.group(1))
    done = [int(m.group(1)) for m in DONE_RE.finditer(text)]
    saved = [int(m.group(1)) for m in SAVED_RE.finditer(text) if m.group(2) == "000000"]
    return RunRecord(resumed_from, done, saved)


def checkpoint_files(directory: Path) -> list[Path]:
    """The checkpoints in `directory` (beside them: the cached pen renderings)."""
    return sorted(train.list_checkpoints(directory))


def assert_checkpoints_load(directory: Path) -> int:
    """Every checkpoint file loads (weights only); returns the newest one's epoch (0: none)."""
    newest = 0
    for path in train.list_checkpoints(directory):
        state = torch.load(path, map_location="cpu", weights_only=True)  # raises if corrupt
        assert state["step"] == 0 and path.name == train.checkpoint_name(state["epoch"], 0)
        newest = max(newest, state["epoch"])
    return newest


def choose_kill(rng: random.Random, index: int) -> tuple[str, str, float]:
    """(description, line pattern to wait for, extra delay in s) of kill number *index*.

    One moment in each of three phases, so that every run is killed at a different kind of
    place: (0) in the middle of an epoch, (1) right at an epoch's end, where the completion is
    logged a few milliseconds before its checkpoint is renamed into place, (2) in epoch 3 or in
    the final evaluation.
    """

    def in_epoch(epoch: int) -> tuple[str, str, float]:
        step = rng.randint(1, STEPS)
        delay = rng.uniform(0, 0.3)
        return (
            f"epoch {epoch} after step {step} + {delay * 1000:.0f} ms",
            rf"epoch {epoch}/3 step {step}/",
            delay,
        )

    if index == 0:
        return in_epoch(1)
    if index == 1:
        delay = rng.uniform(0, 0.015)
        return f"'epoch 2/3 done' + {delay * 1000:.1f} ms", r"epoch 2/3 done", delay
    if rng.random() < 0.5:
        return in_epoch(3)
    delay = rng.uniform(0, 0.5)
    return f"final evaluation + {delay * 1000:.0f} ms", r"training done in", delay


def test_training_survives_sigkill_at_three_random_moments(tmp_path):
    seed = int(os.environ.get("DRILL_SEED") or time.time_ns() % 10**9)
    rng = random.Random(seed)
    print(f"\ntraining drill: DRILL_SEED={seed}")
    data = copy_subset(tmp_path / "data")
    out, ckpt = tmp_path / "out" / "model.pth", tmp_path / "ckpt"
    command = [
        sys.executable, str(ROOT / "train.py"),
        "--data-dir", str(data), "--out", str(out), "--checkpoint-dir", str(ckpt),
        "--limit", "2000", "--epochs", str(EPOCHS), "--log-every", "0",
    ]  # fmt: skip

    records: list[RunRecord] = []
    for index in range(4):
        run = TrainRun(command, tmp_path / f"run{index}.log")
        moment, pattern, delay = choose_kill(rng, index) if index < 3 else ("none", "", 0.0)
        killed = False
        if index < 3:
            try:
                reached = run.wait_for_line(pattern)
                assert reached, f"run {index} ended before {moment}:\n{run.text[-3000:]}"
                time.sleep(delay)
                killed = run.kill()
            finally:
                run.process.kill()
        returncode = run.finish()
        record = parse_run(run.text)
        record.moment, record.killed, record.returncode = moment, killed, returncode
        record.newest_on_disk = assert_checkpoints_load(ckpt)  # no corrupt checkpoint, ever
        record.leftovers = [p.name for p in checkpoint_files(ckpt) if p.suffix != ".pt"]
        records.append(record)
        print(
            f"  run {index}: resumed from epoch {record.resumed_from}, logged done {record.done},"
            f" saved {record.saved}; killed at {moment}: {killed} (exit {returncode}); newest"
            f" checkpoint on disk: epoch {record.newest_on_disk}; other files: {record.leftovers}"
        )
        assert killed or index == 3, f"run {index} had exited before its kill at {moment}"
        if killed:
            assert returncode == -signal.SIGKILL

    final = records[-1]
    assert final.returncode == 0, (tmp_path / "run3.log").read_text()[-3000:]
    assert "model saved to" in (tmp_path / "run3.log").read_text()
    assert final.done == list(range(final.resumed_from + 1, EPOCHS + 1))

    # Where each run resumed, and which epochs could be trained twice.
    twice: set[int] = set()
    for index, record in enumerate(records):
        first = record.resumed_from + 1
        assert record.done == list(range(first, first + len(record.done))), (
            f"run {index} did not continue where it resumed"
        )
        assert set(record.saved) <= set(record.done)
        if index == 0:
            assert record.resumed_from == 0
            continue
        before = records[:index]
        logged_done = max((e for r in before for e in r.done), default=0)
        logged_saved = max((e for r in before for e in r.saved), default=0)
        # It resumes from the newest checkpoint its predecessor left, which is at least the
        # newest one logged as saved, and at most the newest epoch logged as done...
        assert record.resumed_from == before[-1].newest_on_disk
        assert logged_saved <= record.resumed_from <= logged_done
        # ...and at most one behind it: only if the kill fell between the "epoch N done" line
        # and the rename of checkpoint N (so "checkpoint saved" for N was never logged) is
        # epoch N trained again.
        if record.resumed_from < logged_done:
            assert record.resumed_from == logged_done - 1
            assert logged_saved < logged_done
            twice.add(logged_done)

    counts = {epoch: sum(r.done.count(epoch) for r in records) for epoch in range(1, EPOCHS + 1)}
    print(f"  'epoch N/3 done' counts across runs: {counts}; trained twice (allowed): {twice}")
    for epoch, count in counts.items():
        assert count == (2 if epoch in twice else 1), f"epoch {epoch} logged done {count} times"

    # The result: the model loads, checkpoints load, nothing half-written is left anywhere.
    model.load_model(out)
    assert json.loads(out.with_suffix(".json").read_text())["epochs"] == EPOCHS
    assert assert_checkpoints_load(ckpt) == EPOCHS
    assert [p.name for p in checkpoint_files(ckpt)] == [
        train.checkpoint_name(epoch, 0) for epoch in (1, 2, 3)
    ]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left: {leftovers}"


# --- bad input to preprocess: an answer or a clear error, never a crash or a hang ----------------

# Run in a child process: a crash (segfault, abort, out of memory) or a hang in one case is seen
# as such, and named (the case is printed before it runs).
_BAD_INPUT_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    import model, utils

    torch.set_num_threads(1)
    classifier = model.load_model()

    def drawing(size, mode="RGBA"):
        image = Image.new(mode, (size, size), "black")
        pen = ImageDraw.Draw(image)
        points = [(0.25, 0.18), (0.75, 0.18), (0.43, 0.86)]
        points = [(x * size, y * size) for x, y in points]
        pen.line(points, fill="white", width=max(2, size // 15))
        return image

    rng = np.random.default_rng(0)
    noise = lambda shape: rng.integers(0, 256, shape, dtype=np.uint8)
    black, white = np.zeros((280, 280), np.uint8), np.full((280, 280), 255, np.uint8)
    seven = np.asarray(drawing(280))
    big_seven = np.asarray(drawing(5000))
    transparent_big = np.zeros((5000, 5000, 4), np.uint8)
    transparent_big[..., 3] = np.asarray(drawing(5000, "L"))
    line = np.zeros((3, 5000), np.uint8)
    line[1, 500:4500] = 255
    cases = {
        "1x1 grey": lambda: np.zeros((1, 1), np.uint8),
        "1x1 white RGBA": lambda: np.full((1, 1, 4), 255, np.uint8),
        "0x280": lambda: np.zeros((0, 280), np.uint8),
        "280x280 all white RGB": lambda: np.full((280, 280, 3), 255, np.uint8),
        "280x280 all black": lambda: np.zeros((280, 280), np.uint8),
        "280x280 all black RGBA, opaque": lambda: np.dstack([black, black, black, white]),
        "280x280 RGBA, fully transparent": lambda: np.zeros((280, 280, 4), np.uint8),
        "280x280 random noise RGB": lambda: noise((280, 280, 3)),
        "280x280 random noise RGBA": lambda: noise((280, 280, 4)),
        "280x280 drawing of a 7": lambda: seven,
        "5000x5000 drawing of a 7": lambda: big_seven,
        "5000x5000 transparent drawing of a 7": lambda: transparent_big,
        "5000x5000 all white RGBA": lambda: np.full((5000, 5000, 4), 255, np.uint8),
        "5000x5000 all black": lambda: np.zeros((5000, 5000), np.uint8),
        "5000x5000 random noise grey": lambda: noise((5000, 5000)),
        "5000x5000 random noise RGBA": lambda: noise((5000, 5000, 4)),
        "3x5000 line": lambda: line,
        "5000x3 line": lambda: np.ascontiguousarray(line.T),
        "1x5000 white": lambda: np.full((1, 5000), 255, np.uint8),
        "reversed view (negative strides)": lambda: seven[::-1, ::-1],
        "Fortran-ordered": lambda: np.asfortranarray(seven),
        "every other pixel (strided view)": lambda: seven[::2, ::2],
        "float32 in [0, 1]": lambda: seven.astype(np.float32) / 255,
        "float64 0-255": lambda: seven.astype(np.float64),
        "float32 NaN": lambda: np.full((280, 280), np.nan, np.float32),
        "uint16": lambda: seven.astype(np.uint16) * 257,
        "int64": lambda: seven.astype(np.int64),
        "int8": lambda: (seven // 2).astype(np.int8),
        "bool": lambda: seven[..., 0] > 0,
        "2-channel (grey + alpha)": lambda: np.dstack([seven[..., 0], seven[..., 3]]),
        "5-channel": lambda: np.zeros((280, 280, 5), np.uint8),
        "4-D batch": lambda: seven[None],
        "1-D": lambda: np.zeros(280, np.uint8),
        "0-D": lambda: np.uint8(7),
        "nested list": lambda: seven.tolist(),
        "bytes": lambda: b"\\x89PNG",
        "None": lambda: None,
        "PIL LA (grey + alpha)": lambda: drawing(280, "LA"),
        "PIL I;16": lambda: drawing(280, "L").convert("I;16"),
        "PIL F": lambda: drawing(280, "L").convert("F"),
        "PIL CMYK": lambda: drawing(280, "RGB").convert("CMYK"),
        "PIL P (palette)": lambda: drawing(280, "RGB").convert("P"),
        "PIL 1 (bilevel)": lambda: drawing(280, "1"),
    }
    for name, make in cases.items():
        image = make()
        print(json.dumps({"case": name, "start": True}), flush=True)
        start = time.perf_counter()
        try:
            batch = utils.preprocess(image)
            prediction = model.predict(classifier, batch)
            outcome = {"outcome": "prediction", "digit": prediction.digit,
                       "finite": bool(torch.isfinite(batch).all()), "shape": list(batch.shape)}
        except Exception as exc:
            outcome = {"outcome": type(exc).__name__, "message": str(exc)}
        outcome.update(case=name, seconds=time.perf_counter() - start)
        print(json.dumps(outcome), flush=True)
    """
)

EMPTY, FORMAT, PREDICTION = "EmptyImageError", "ImageFormatError", "prediction"
ANY_ANSWER = {EMPTY, PREDICTION}
EXPECTED_OUTCOMES = {
    "1x1 grey": {EMPTY},
    "1x1 white RGBA": {EMPTY},
    "0x280": {EMPTY},
    "280x280 all white RGB": {EMPTY},
    "280x280 all black": {EMPTY},
    "280x280 all black RGBA, opaque": {EMPTY},
    "280x280 RGBA, fully transparent": {EMPTY},
    "280x280 random noise RGB": ANY_ANSWER,
    "280x280 random noise RGBA": ANY_ANSWER,
    "280x280 drawing of a 7": {PREDICTION},
    "5000x5000 drawing of a 7": {PREDICTION},
    "5000x5000 transparent drawing of a 7": {PREDICTION},
    "5000x5000 all white RGBA": {EMPTY},
    "5000x5000 all black": {EMPTY},
    "5000x5000 random noise grey": ANY_ANSWER,
    "5000x5000 random noise RGBA": ANY_ANSWER,
    "3x5000 line": ANY_ANSWER,
    "5000x3 line": ANY_ANSWER,
    "1x5000 white": {EMPTY},
    "reversed view (negative strides)": {PREDICTION},
    "Fortran-ordered": {PREDICTION},
    "every other pixel (strided view)": {PREDICTION},
    "float32 in [0, 1]": {FORMAT},
    "float64 0-255": {FORMAT},
    "float32 NaN": {FORMAT},
    "uint16": {FORMAT},
    "int64": {FORMAT},
    "int8": {FORMAT},
    "bool": {FORMAT},
    "2-channel (grey + alpha)": {FORMAT},
    "5-channel": {FORMAT},
    "4-D batch": {FORMAT},
    "1-D": {FORMAT},
    "0-D": {FORMAT},
    "nested list": {FORMAT},
    "bytes": {FORMAT},
    "None": {FORMAT},
    "PIL LA (grey + alpha)": {PREDICTION},
    "PIL I;16": {PREDICTION},
    "PIL F": {PREDICTION},
    "PIL CMYK": {PREDICTION},
    "PIL P (palette)": {PREDICTION},
    "PIL 1 (bilevel)": {PREDICTION},
}
CASE_TIMEOUT_S = 20  # the slowest case (5000x5000 RGBA) takes ~0.5 s on 2 idle cores


def test_bad_images_give_an_answer_or_a_clear_error_never_a_crash_or_hang(tmp_path):
    log = tmp_path / "bad-input.jsonl"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", _BAD_INPUT_WORKER],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + 60 + CASE_TIMEOUT_S * len(EXPECTED_OUTCOMES)
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        hung = process.poll() is None
        if hung:
            process.kill()
        _, stderr = process.communicate(timeout=30)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    started = [r["case"] for r in records if r.get("start")]
    results = {r["case"]: r for r in records if not r.get("start")}
    unfinished = [case for case in started if case not in results]
    assert not hung, f"hung on {unfinished}"
    assert process.returncode == 0, (
        f"crashed (exit {process.returncode}) on {unfinished}:\n{stderr}"
    )
    assert list(results) == list(EXPECTED_OUTCOMES)

    print("\nbad input to utils.preprocess + model.predict:")
    for case, result in results.items():
        detail = result.get("message") or f"digit {result.get('digit')}"
        print(f"  {case:40} {result['seconds'] * 1000:8.1f} ms  {result['outcome']}: {detail}")
    problems = []
    for case, expected in EXPECTED_OUTCOMES.items():
        result = results[case]
        if result["outcome"] not in expected:
            problems.append(f"{case}: {result['outcome']} {result.get('message', '')}")
        elif result["outcome"] == PREDICTION:
            if not (result["finite"] and result["shape"] == [1, 1, 28, 28]):
                problems.append(f"{case}: model input {result}")
        elif len(result["message"]) < 10:
            problems.append(f"{case}: unclear message {result['message']!r}")
        if result["seconds"] > CASE_TIMEOUT_S:
            problems.append(f"{case}: took {result['seconds']:.1f} s")
    assert not problems, "\n".join(problems)
    # Size does not change what the model sees: the 5000x5000 drawing reads as the 280x280 one.
    small, big = results["280x280 drawing of a 7"], results["5000x5000 drawing of a 7"]
    assert (
        big["digit"] == small["digit"] == results["5000x5000 transparent drawing of a 7"]["digit"]
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims *width* x *height* pixels (its data is one pixel's): what a client can
    send as the canvas's data URL."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])  # IHDR: size, then flags
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@pytest.mark.parametrize(
    "png",
    [
        b"not a png",
        png_header(1, 1)[:40],
        png_header(20_000, 20_000),  # over Pillow's decompression-bomb limit
        png_header(12_000, 12_000),  # a header alone: a truncated image
    ],
    ids=["garbage", "truncated", "over-pillow-bomb-limit", "huge-header-no-data"],
)
def test_an_unreadable_drawing_gives_a_hint_not_an_exception(png):
    import app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        analysis = app.analyse(png, "digest", model.DigitCNN().eval())
    assert analysis.prediction is None and analysis.hint
