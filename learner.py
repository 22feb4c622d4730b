"""The feedback loop, run by itself: when enough people have answered, train a candidate on
their drawings beside MNIST and the pen digits, and make it live only by the promotion rule.

    python learner.py            # for ever: a check every CHECK_S seconds, an attempt when due
    python learner.py --once     # one check (and the attempt, if due), then exit

An attempt is due when at least LEARN_MIN_ANSWERS answered drawings have arrived since the last
attempt's and the last attempt began at least LEARN_EVERY ago (settings.py; an attempt that was
killed half-way does not count). One attempt at a time across every machine: a PostgreSQL
advisory lock, held by the learner making the attempt until it ends; another learner finds it
taken and waits for its next check.

An attempt is a row of ``learning_attempts`` from its start ('running'), then 'promoted',
'refused', 'failed' or 'interrupted', with the promotion's report (History shows them). It runs
`train.py` with RECIPE (then LEARN_TRAIN_ARGS) in a folder of its own, with --promote: the
candidate goes live only by the rule, at the very end, in one transaction. A candidate refused
only for want of evidence (rule 1: people's held-out answers could not tell it from the live
model) runs in shadow until the next attempt, which first judges it again with the answers it
gave there (`versions.py promote`). Killed at any moment, nothing is promoted; the next check
marks the attempt interrupted, removes its folder and starts afresh. SIGTERM (docker stop) stops
the training and ends the attempt as interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

import db
import settings
from registry import store
from registry.promotion import EXIT_REFUSED

log = logging.getLogger("learner")

ROOT = Path(__file__).resolve().parent
CHECK_S = 60.0  # how often a waiting learner looks at the database
LOCK_KEY = 0x4D4E49534C  # one attempt at a time, across every machine
EXIT_TERMINATED = 143  # train.py's code after SIGTERM: it saved a checkpoint and stopped
# The recipe: train.py's flags for a candidate (docs/feedback-loop.md says how it was chosen).
RECIPE = ("--sources", "mnist,pen,feedback", "--members", "2", "--download")
RULE_1 = "not better on"  # how a refusal for want of evidence begins (registry.promotion)
# Answered drawings: what the feedback source trains on (training.sources.read_feedback).
ANSWERS_QUERY = """
SELECT count(*) FILTER (WHERE p.id > %(since)s), count(*), coalesce(max(p.id), 0)
FROM predictions p JOIN drawings d ON d.prediction_id = p.id
"""


@dataclass(frozen=True)
class Due:
    """An attempt to make: answered drawings in all, those since the last attempt, the newest."""

    answers: int
    new_answers: int
    through_id: int


class Stop:
    """SIGTERM or SIGINT: stop waiting, or stop the attempt's training (it saves a checkpoint
    and exits; the attempt is interrupted)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.child: subprocess.Popen | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.requested.set()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def check(
    conninfo: str, work_dir: Path, out: Path, stop: Stop | None = None
) -> tuple[int, str] | None:
    """One check: if no other learner holds the lock and an attempt is due, make it; its id and
    how it ended, else None."""
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=db.CONNECT_TIMEOUT_S) as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:
            log.info("another learner is making an attempt")
            return None
        try:
            close_interrupted(conn, work_dir)
            due = due_attempt(conn)
            if due is None:
                return None
            return attempt(conn, conninfo, due, work_dir, out, stop or Stop())
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def close_interrupted(conn: psycopg.Connection, work_dir: Path) -> None:
    """Attempts left running by a learner that was killed (this one holds the lock: no other is
    running) are interrupted; their folders go."""
    for (attempt_id,) in conn.execute(
        "UPDATE learning_attempts SET state = 'interrupted', finished_at = now(),"
        " message = 'the learner stopped before the attempt ended; nothing was promoted'"
        " WHERE state = 'running' RETURNING id"
    ).fetchall():
        log.warning("attempt %d was interrupted (its learner was killed)", attempt_id)
        shutil.rmtree(work_dir / f"attempt-{attempt_id}", ignore_errors=True)


def due_attempt(conn: psycopg.Connection) -> Due | None:
    """The attempt to make now, or None (logged: why not)."""
    last = conn.execute(
        "SELECT through_id, now() - started_at >= make_interval(secs => %s)"
        " FROM learning_attempts WHERE state <> 'interrupted' ORDER BY id DESC LIMIT 1",
        (settings.learn_every(),),
    ).fetchone()
    since, waited = last if last else (0, True)
    new, answers, newest = conn.execute(ANSWERS_QUERY, {"since": since}).fetchone()
    needed = settings.learn_min_answers()
    if new < needed:
        log.info("%d new answers since the last attempt; the next at %d", new, needed)
        return None
    if not waited:
        log.info("%d new answers, but the last attempt began less than LEARN_EVERY ago", new)
        return None
    return Due(answers, new, newest)


def attempt(
    conn: psycopg.Connection, conninfo: str, due: Due, work_dir: Path, out: Path, stop: Stop
) -> tuple[int, str]:
    """Make the attempt `due`, recorded from its start: first the candidate in shadow, if one
    is, judged again with the answers it gave there (`versions.py promote`); unless that one
    goes live, a new candidate trained (train.py with the recipe), in a folder of its own. A
    new candidate refused only for want of evidence (rule 1) runs in shadow until the next
    attempt. Its id and how it ended."""
    (attempt_id,) = conn.execute(
        "INSERT INTO learning_attempts (answers, new_answers, through_id) VALUES (%s, %s, %s)"
        " RETURNING id",
        (due.answers, due.new_answers, due.through_id),
    ).fetchone()
    folder = work_dir / f"attempt-{attempt_id}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log.info(
        "attempt %d: %d answered drawings, %d new since the last attempt",
        attempt_id,
        due.answers,
        due.new_answers,
    )
    state, report, message = "", {}, ""
    if (shadow := store.shadow_sha(conn)) is not None:
        judged = ["versions.py", "promote", shadow, "--out", str(out)]
        state, report, message = run(judged, folder / "judged.json", conninfo, stop)
        store.set_shadow(None, conninfo=conninfo)  # live now, or judged: no longer in shadow
        if state != "promoted":
            log.info("the candidate in shadow, %s, stays a candidate: %s", shadow[:12], message)
    if state not in ("promoted", "interrupted"):
        trained = [
            "train.py", *RECIPE, *settings.learn_train_args(), "--promote", "--fresh",
            "--checkpoint-dir", str(folder), "--out", str(out),
        ]  # fmt: skip
        state, report, message = run(trained, folder / "report.json", conninfo, stop)
        if state == "refused" and wants_evidence(report):
            store.set_shadow(report["candidate"], conninfo=conninfo)
            message += "; in shadow beside the live model until the next attempt judges it again"
    # On a connection of its own: the lock's may have been idle for the whole training.
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=db.CONNECT_TIMEOUT_S) as own:
        own.execute(
            "UPDATE learning_attempts SET state = %s, finished_at = now(), candidate = %s,"
            " report = %s, message = %s, through_id = %s WHERE id = %s",
            (
                state,
                report.get("candidate"),
                Jsonb(report),
                message,
                _trained_through(folder) or due.through_id,
                attempt_id,
            ),
        )
    shutil.rmtree(folder, ignore_errors=True)
    log.info("attempt %d %s: %s", attempt_id, state, message)
    return attempt_id, state


def wants_evidence(report: dict) -> bool:
    """Whether a refusal was for want of evidence only: rule 1 alone refused (people's held-out
    answers could not tell the candidate from the live model), every guard passed."""
    reasons = report.get("reasons") or []
    return bool(reasons) and all(reason.startswith(RULE_1) for reason in reasons)


def run(command: list[str], report_path: Path, conninfo: str, stop: Stop) -> tuple[str, dict, str]:
    """`command` (a script of this project and its arguments) run with --report, its output
    passed on to ours; how it ended, its report, and in words."""
    command = [sys.executable, str(ROOT / command[0]), *command[1:], "--report", str(report_path)]
    log.info("running %s", " ".join(command[1:]))
    stop.child = subprocess.Popen(command, cwd=ROOT, env=_child_env(conninfo))
    code = stop.child.wait()
    stop.child = None
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    state, message = _verdict(code, report)
    return state, report, message


def _child_env(conninfo: str) -> dict[str, str]:
    """train.py's environment: this one, with the owner's connection string (it reads drawings
    and registers versions)."""
    return {**settings.environment(), "DATABASE_URL": conninfo, "PYTHONUNBUFFERED": "1"}


def _verdict(code: int, report: dict) -> tuple[str, str]:
    if code == 0 and report.get("promoted"):
        return "promoted", f"the candidate {report['candidate'][:12]} is live"
    if code == EXIT_REFUSED:
        return "refused", "; ".join(report.get("reasons", [])) or "refused"
    if code in (EXIT_TERMINATED, -signal.SIGTERM):
        return "interrupted", "stopped (SIGTERM) before the attempt ended; nothing was promoted"
    return "failed", f"it exited with code {code}: its log above says why; nothing was promoted"


def _trained_through(folder: Path) -> int | None:
    """The newest answer the candidate trained on (its model.json), if it got that far."""
    try:
        info = json.loads((folder / "candidate.json").read_text())
    except (OSError, ValueError):
        return None
    return info.get("feedback_rows_through_id")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="one check, then exit")
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / "models" / "learner", help="attempts' folders"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "models" / "model.pth", help="the live model's file"
    )
    args = parser.parse_args(argv)
    stop = Stop()
    stop.install()
    conninfo = db.resolve_conninfo(owner=True)
    db.migrate(conninfo, app_role=None)  # learning_attempts exists (grants: `db.py migrate`)
    log.info(
        "learning when %d new answers have arrived, at most once per %.0f s (LEARN_MIN_ANSWERS,"
        " LEARN_EVERY)",
        settings.learn_min_answers(),
        settings.learn_every(),
    )
    while not stop.requested.is_set():
        try:
            check(conninfo, args.work_dir, args.out, stop)
        except (psycopg.OperationalError, db.DatabaseUnavailable) as exc:
            log.warning("database unreachable, trying again in %.0f s: %s", CHECK_S, exc)
        if args.once:
            break
        stop.requested.wait(CHECK_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
