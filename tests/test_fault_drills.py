"""Fault drills with real processes: training killed at random moments and (marked
``browser``) the database failing under a real ``streamlit run`` app, and 8 users at once.

Each drill prints what it did (run pytest with ``-s`` to see it). The random moments of the
training drill come from a seed printed at the start; ``DRILL_SEED=<seed>`` replays them.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from mnist_files import copy_subset

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


# --- browser drills: a real `streamlit run` app --------------------------------------------------

# One-stroke digits: tests/test_browser.py covers multi-stroke drawing after a saved answer.
ONE_STROKE = {
    0: None,  # browser.DIGIT_STROKES[0], a single closed oval
    1: [[(150, 52), (146, 100), (141, 150), (137, 200), (134, 236)]],
    7: [[(74, 64), (134, 59), (194, 58), (208, 60), (190, 98), (154, 176), (128, 238)]],
}


def one_stroke(digit: int):
    from lab import browser

    return ONE_STROKE[digit] or browser.DIGIT_STROKES[digit]


def stored_rows(server) -> list[tuple]:
    with server.connect() as conn:
        return conn.execute(
            "SELECT predicted_digit, true_label, confidence, submission_id FROM predictions"
            " ORDER BY id"
        ).fetchall()


def app_log_problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Traceback" in line or "CRITICAL" in line]


@pytest.fixture(scope="module")
def chromium_browser():
    from lab import browser

    try:
        browser.chromium_executable()
    except browser.ChromiumMissing as exc:
        pytest.fail(str(exc))
    with browser.chromium() as instance:
        yield instance


@pytest.mark.browser
def test_database_down_at_startup_crash_restart_and_long_outage(
    chromium_browser, fresh_pg_server, tmp_path
):
    """The app process starts while PostgreSQL is down, the server then comes and goes (a
    crash, a restart while idle, an outage over several retries): predictions never stop, every
    failed answer is kept for a retry, and each answer is stored exactly once. Unicode digits
    typed in the real text field are refused on the way. (tests/test_browser.py covers one
    outage in the middle of a session.)"""
    import app
    from lab import browser

    fresh_pg_server.stop()
    process = browser.AppProcess(fresh_pg_server.url, log_path=tmp_path / "app.log")
    with process:
        page = browser.AppPage.open(chromium_browser, process.url)
        try:
            # 1. No database at startup: the page says so, and still predicts.
            assert app.DATABASE_DOWN_BANNER in page.alerts()
            page.draw(one_stroke(0))
            zero = page.wait_for_prediction()
            page.click_correct()
            assert app.FEEDBACK_NOT_SAVED in page.alerts()
            page.click_correct()  # a second failed retry changes nothing
            assert app.FEEDBACK_NOT_SAVED in page.alerts()
            assert page.prediction() == zero and page.ink_pixels() > 500

            # 2. The database comes up: the same answer, retried, is stored once.
            fresh_pg_server.start()
            page.click_correct()
            assert f"Saved: you drew a {zero.digit}" in " ".join(page.alerts())
            assert app.DATABASE_DOWN_BANNER not in page.alerts()
            assert len(stored_rows(fresh_pg_server)) == 1

            # 3. A crash (immediate stop) and restart while the app is idle: the pooled
            # connections are dead, the next answer is stored at the first attempt.
            fresh_pg_server.stop(mode="immediate")
            fresh_pg_server.start()
            page.draw(one_stroke(7))
            seven = page.wait_for_prediction()
            # Typed in the real text field: Unicode sevens are refused, nothing is stored.
            for text in ("\u0667", "\uff17", "7\u200b", "7; DROP TABLE predictions"):
                page.submit_correction(text)
                assert "The true label must be one digit from 0 to 9." in page.alerts(), text
            assert len(stored_rows(fresh_pg_server)) == 1
            page.submit_correction("7")
            assert app.FEEDBACK_NOT_SAVED not in page.alerts(), page.alerts()
            assert len(stored_rows(fresh_pg_server)) == 2

            # 4. An outage over three retries, a correction typed in between, then back.
            page.draw(one_stroke(1))
            one = page.wait_for_prediction()
            fresh_pg_server.stop()
            page.submit_correction("4")
            page.submit_correction()
            page.submit_correction("1")  # the person changes the label while it is down
            assert app.FEEDBACK_NOT_SAVED in page.alerts()
            assert page.prediction() == one
            fresh_pg_server.start()
            page.submit_correction()
            assert "Saved: you drew a 1" in " ".join(page.alerts()), page.alerts()

            # 5. History works again and lists exactly the three answers.
            page.open_history()
            assert len(page.history_rows()) == 3
        finally:
            page.close()
        rows = stored_rows(fresh_pg_server)
        assert [(p, t) for p, t, _, _ in rows] == [
            (zero.digit, zero.digit),
            (seven.digit, 7),
            (one.digit, 1),
        ]
        assert len({row[3] for row in rows}) == 3
        assert process.is_running, process.log_tail()
    log = process.log_text()
    assert "starting without a database" in log
    assert not app_log_problems(log), app_log_problems(log)


SESSIONS = 16
DIGITS_PER_SESSION = 5


@pytest.mark.browser
def test_sixteen_people_draw_and_submit_five_digits_each_at_once(
    chromium_browser, fresh_pg_server, tmp_path
):
    """16 sessions (browser contexts in one Chromium) of one app process, in lockstep: in each
    round all 16 draw a digit, holding the mouse button down at the end, then release it one
    right after the other, so the app gets the 16 drawings at once; then all 16 answer (Correct
    or Submit correction) before any reply is awaited, more than the pool's connections. Every
    answer is stored exactly once, with the prediction and confidence its own session showed,
    and no page shows an error. (Stroke-to-prediction figures: ``python -m bench``.)"""
    import app
    from lab import browser

    expected: list[tuple[int, int, float]] = []  # (shown prediction, true label, confidence %)
    process = browser.AppProcess(fresh_pg_server.url, log_path=tmp_path / "app.log")
    with process:
        pages = [browser.AppPage.open(chromium_browser, process.url) for _ in range(SESSIONS)]
        started = time.monotonic()
        try:
            for n in range(DIGITS_PER_SESSION):
                digits = [(0, 1, 7)[(index + n) % 3] for index in range(SESSIONS)]
                for page, digit in zip(pages, digits, strict=True):
                    page.draw_held(one_stroke(digit))
                for page in pages:  # all 8 drawings are sent within a few milliseconds
                    page.page.mouse.up()
                released = [page.last_pointer_up_ms() for page in pages]
                shown = []
                for page, up in zip(pages, released, strict=True):
                    page.wait_until_idle(up + browser.CANVAS_DEBOUNCE_MS - 5)
                    shown.append(page.wait_for_prediction())
                labels, clicked = [], []
                for index, page in enumerate(pages):
                    if (index + n) % 2:
                        labels.append((digits[index] + index) % 10)
                        page.type_true_label(str(labels[-1]))
                        button = page.button(app.SUBMIT_CORRECTION_BUTTON)
                    else:
                        labels.append(shown[index].digit)
                        button = page.button(app.CORRECT_BUTTON)
                    clicked.append(page.now_ms())
                    button.click()
                for index, page in enumerate(pages):
                    page.wait_until_idle(clicked[index])
                    alerts = page.alerts()
                    saved = f"Saved: you drew a {labels[index]} (model said {shown[index].digit}"
                    assert any(alert.startswith(saved) for alert in alerts), (index, n, alerts)
                    problems = [a for a in alerts if "not saved" in a or "unavailable" in a]
                    assert not problems and app.DATABASE_DOWN_BANNER not in alerts, alerts
                    expected.append(
                        (shown[index].digit, labels[index], shown[index].confidence_percent)
                    )
        finally:
            for page in pages:
                page.close()
        elapsed = time.monotonic() - started
        assert process.is_running, process.log_tail()

    rows = stored_rows(fresh_pg_server)
    assert len(rows) == SESSIONS * DIGITS_PER_SESSION
    # Each row as its session showed it (the page shows the confidence to 0.1%).
    unmatched = [(p, t, c * 100) for p, t, c, _ in rows]
    for digit, label, percent in expected:
        match = next(
            row
            for row in unmatched
            if row[:2] == (digit, label) and abs(row[2] - percent) <= 0.05 + 1e-4
        )
        unmatched.remove(match)
    assert len({row[3] for row in rows}) == len(rows), "a submission_id stored twice"
    log = process.log_text()
    assert not app_log_problems(log), app_log_problems(log)
    print(f"\n{SESSIONS} sessions x {DIGITS_PER_SESSION} digits in {elapsed:.0f} s")
