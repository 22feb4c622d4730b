"""learner.py against a real PostgreSQL, with real (tiny) training runs of train.py on the
committed subsets: when an attempt is due, one attempt at a time across learners, and a learner
killed half-way promotes nothing and leaves the next attempt a clean start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mnist_files import PEN_SUBSET, SUBSET

import learner
import pendigits
from lab import people
from model import DigitCNN
from registry import store

ROOT = Path(__file__).resolve().parent.parent
# The recipe's flags, then these: a run of seconds on the subsets.
TINY = (
    f"--data-dir {SUBSET} --pen-file {PEN_SUBSET} --limit 100 --epochs 1"
    " --trajectory-epochs 1 --members 1 --log-every 0.5"
)


@pytest.fixture
def loop(fresh_pg_server, tmp_path, monkeypatch):
    """A database with the app's tables, a first live model (untrained weights) in `out`, the
    learner's settings: an attempt after 4 new answers, at most once an hour."""
    people.create_schema(fresh_pg_server.url)
    out = tmp_path / "live" / "model.pth"
    out.parent.mkdir()
    torch.manual_seed(0)
    torch.save(DigitCNN().state_dict(), out)
    for name, value in {
        "LEARN_MIN_ANSWERS": "4",
        "LEARN_EVERY": "1h",
        "LEARN_TRAIN_ARGS": TINY,
        "OMP_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    return fresh_pg_server, tmp_path / "work", out


def answer(server, count: int, start: int) -> None:
    """*count* pen digits of the subset answered in the app (with their drawings)."""
    digits = pendigits.load(PEN_SUBSET)[start : start + count]
    people.answer_all(server.url, digits, DigitCNN().eval(), "model.pth@0123456789ab", seed=start)


def attempts(server) -> list[tuple]:
    with server.connect() as conn:
        return conn.execute(
            "SELECT state, answers, new_answers, candidate IS NOT NULL, report ? 'table'"
            " FROM learning_attempts ORDER BY id"
        ).fetchall()


def test_an_attempt_waits_for_enough_new_answers_then_for_learn_every(loop, monkeypatch):
    server, work, out = loop
    answer(server, 3, start=0)
    assert learner.check(server.url, work, out) is None  # 3 new answers: 4 needed
    answer(server, 2, start=3)

    _, state = learner.check(server.url, work, out)

    assert state in ("promoted", "refused")
    assert attempts(server) == [(state, 5, 5, True, True)]  # a candidate, the comparison
    assert not (work / "attempt-1").exists()  # its folder removed
    answer(server, 4, start=5)
    assert learner.check(server.url, work, out) is None  # within LEARN_EVERY of the last
    monkeypatch.setenv("LEARN_EVERY", "0")
    learner.check(server.url, work, out)
    assert [row[1:3] for row in attempts(server)] == [(5, 5), (9, 4)]


def test_two_learners_at_once_make_one_attempt(loop):
    server, work, out = loop
    answer(server, 4, start=0)
    start = threading.Barrier(2)
    results = []

    def one_learner(index: int) -> None:
        start.wait()
        results.append(learner.check(server.url, work / str(index), out))

    threads = [threading.Thread(target=one_learner, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert sorted(results, key=lambda r: r is None)[1] is None  # one made it, one found the lock
    assert len(attempts(server)) == 1


def test_a_learner_killed_half_way_promotes_nothing_and_the_next_starts_afresh(loop):
    server, work, out = loop
    answer(server, 4, start=0)
    with server.connect() as conn:
        live = store.ensure_live(conn, out)
    command = [sys.executable, str(ROOT / "learner.py"), "--once", "--work-dir", str(work)]
    env = {**os.environ, "DATABASE_URL": server.url, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [*command, "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the learner and its train.py: one group, killed at once
    )
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:  # until the training is under way
            if "epoch 1/1 step" in line or time.monotonic() > deadline:
                break
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    assert attempts(server) == [("running", 4, 4, False, False)]  # as the kill left it
    assert (work / "attempt-1").is_dir()
    with server.connect() as conn:
        assert store.live_sha(conn) == live  # nothing promoted

    answer(server, 4, start=4)
    _, state = learner.check(server.url, work, out)

    found = attempts(server)
    assert found[0][0] == "interrupted" and found[1][0] == state
    assert found[1][1:3] == (8, 8)  # the killed attempt did not count: all 8 answers are new
    assert not (work / "attempt-1").exists()


def test_a_refusal_for_want_of_evidence_alone_is_told_from_one_by_a_guard():
    assert learner.wants_evidence({"reasons": ["not better on held-out feedback: 0 drawings"]})
    assert not learner.wants_evidence(
        {"reasons": ["not better on held-out feedback: 0", "worse on MNIST test: 9 only"]}
    )
    assert not learner.wants_evidence({"reasons": []})


def test_the_candidate_in_shadow_is_judged_first_and_goes_live_on_its_shadow_answers(
    loop, monkeypatch
):
    """A candidate that reads every drawing as the live model does runs in shadow; its answers
    there show it better: the next attempt promotes it without training one more, and ends the
    shadow."""
    from test_registry_promotion import same_answers_other_version, store_shadow_answers

    server, work, out = loop
    monkeypatch.setenv("MNIST_DIR", str(SUBSET))
    monkeypatch.setenv("PENDIGITS_DIR", str(PEN_SUBSET.parent))
    out.write_bytes((ROOT / "models" / "model.pth").read_bytes())
    candidate = same_answers_other_version()
    with server.connect() as conn:
        live = store.ensure_live(conn, out)
        store.register(conn, candidate, {})
    store.set_shadow(store.sha256_of(candidate)[:12], conninfo=server.url)
    store_shadow_answers(server, live, store.sha256_of(candidate), [(1, 7, 7), (2, 3, 3)])
    answer(server, 4, start=0)

    _, state = learner.check(server.url, work, out)

    assert state == "promoted"
    with server.connect() as conn:
        assert store.live_sha(conn) == store.sha256_of(candidate)
        assert store.shadow_sha(conn) is None
        (trained,) = conn.execute("SELECT count(*) FROM model_versions").fetchone()
    assert trained == 2  # the live model and the candidate: none trained
