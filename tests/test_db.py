"""db.py against real PostgreSQL servers (see conftest.py); nothing is mocked."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import psycopg
import pytest
from conftest import ROOT, PostgresProcess, TcpProxy, pg_command
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict

import db

INJECTION = "1); DROP TABLE predictions; --"


def table_exists(server: PostgresProcess) -> bool:
    with server.connect() as conn:
        return conn.execute("SELECT to_regclass('predictions') IS NOT NULL").fetchone()[0]


def count_rows(server: PostgresProcess) -> int:
    with server.connect() as conn:
        return conn.execute("SELECT count(*) FROM predictions").fetchone()[0]


def raw_insert(server: PostgresProcess, predicted, true_label, confidence, submission_id=None):
    with server.connect() as conn:
        conn.execute(
            "INSERT INTO predictions (predicted_digit, true_label, confidence, submission_id)"
            " VALUES (%s, %s, %s, %s)",
            (predicted, true_label, confidence, submission_id),
        )


# --- schema -------------------------------------------------------------------------------------


def test_schema_is_created_once_as_specified(clean_db):
    db.init_db()
    db.init_db()
    with clean_db.connect() as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'predictions'"
        ).fetchone()[0]
        columns = conn.execute(
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_name = 'predictions'"
            " ORDER BY ordinal_position"
        ).fetchall()
        constraints = dict(
            conn.execute(
                "SELECT pg_get_constraintdef(oid), contype FROM pg_constraint"
                " WHERE conrelid = 'predictions'::regclass"
            ).fetchall()
        )
    assert tables == 1
    assert [(name, type_, nullable) for name, type_, nullable, _ in columns] == [
        ("id", "bigint", "NO"),
        ("created_at", "timestamp with time zone", "NO"),
        ("predicted_digit", "smallint", "NO"),
        ("true_label", "smallint", "NO"),
        ("confidence", "real", "NO"),
        ("submission_id", "uuid", "YES"),
        ("model", "text", "YES"),
    ]
    defaults = {name: default for name, _, _, default in columns}
    assert defaults["id"].startswith("nextval(")  # bigserial
    assert defaults["created_at"] == "now()"
    assert constraints == {
        "PRIMARY KEY (id)": "p",
        "UNIQUE (submission_id)": "u",  # exactly one, even after repeated init_db
        "CHECK (((predicted_digit >= 0) AND (predicted_digit <= 9)))": "c",
        "CHECK (((true_label >= 0) AND (true_label <= 9)))": "c",
        "CHECK (((confidence >= (0)::double precision) AND "
        "(confidence <= (1)::double precision)))": "c",
        "CHECK (((char_length(model) >= 1) AND (char_length(model) <= 100)))": "c",
    }


def test_init_db_upgrades_a_table_without_submission_id(pg_server):
    with pg_server.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS predictions")
        conn.execute(
            "CREATE TABLE predictions (id bigserial PRIMARY KEY,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " predicted_digit smallint NOT NULL CHECK (predicted_digit BETWEEN 0 AND 9),"
            " true_label smallint NOT NULL CHECK (true_label BETWEEN 0 AND 9),"
            " confidence real NOT NULL CHECK (confidence BETWEEN 0 AND 1))"
        )
        conn.execute(
            "INSERT INTO predictions (predicted_digit, true_label, confidence) VALUES (4, 9, 0.5)"
        )
    db.configure(pg_server.url)
    db.init_db()
    sid = uuid.uuid4()
    new_id = db.log_prediction(1, 1, 0.9, submission_id=sid)
    assert db.log_prediction(1, 1, 0.9, submission_id=sid) == new_id
    rows = db.recent_predictions()
    assert [(r["predicted_digit"], r["true_label"]) for r in rows] == [(1, 1), (4, 9)]


# The table as created before the model column existed.
TABLE_WITHOUT_MODEL = """
    CREATE TABLE predictions (
        id bigserial PRIMARY KEY,
        created_at timestamptz NOT NULL DEFAULT now(),
        predicted_digit smallint NOT NULL CHECK (predicted_digit BETWEEN 0 AND 9),
        true_label smallint NOT NULL CHECK (true_label BETWEEN 0 AND 9),
        confidence real NOT NULL CHECK (confidence >= 0 AND confidence <= 1),
        submission_id uuid UNIQUE
    )
"""


def test_init_db_adds_the_model_column_and_keeps_every_row(pg_server):
    with pg_server.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS predictions")
        conn.execute(TABLE_WITHOUT_MODEL)
        conn.execute(
            "INSERT INTO predictions (created_at, predicted_digit, true_label, confidence,"
            " submission_id) SELECT now() - n * interval '1 minute', n % 10, n * 3 % 10,"
            " n % 101 / 100.0, gen_random_uuid() FROM generate_series(1, 1000) AS n"
        )
        before = conn.execute("SELECT * FROM predictions ORDER BY id").fetchall()
    db.configure(pg_server.url)
    db.init_db()
    db.log_prediction(1, 1, 0.9, model=MODEL_A)
    with pg_server.connect() as conn:
        after = conn.execute("SELECT * FROM predictions ORDER BY id").fetchall()
    assert [row[:-1] for row in after[:-1]] == before
    assert [row[-1] for row in after] == [None] * 1000 + [MODEL_A]


# --- round trip ---------------------------------------------------------------------------------


def test_rows_round_trip_newest_first(clean_db):
    before = datetime.now(UTC)
    ids = [db.log_prediction(3, 3, 0.25), db.log_prediction(7, 1, 1.0), db.log_prediction(0, 9, 0)]
    assert len(set(ids)) == 3
    assert count_rows(clean_db) == 3
    assert db.count_predictions() == 3

    rows = db.recent_predictions()
    assert [r["id"] for r in rows] == ids[::-1]
    assert [(r["predicted_digit"], r["true_label"]) for r in rows] == [(0, 9), (7, 1), (3, 3)]
    assert [r["confidence"] for r in rows] == [0.0, 1.0, 0.25]
    assert set(rows[0]) == {
        "id", "created_at", "predicted_digit", "true_label", "confidence", "model"
    }  # fmt: skip
    for row in rows:
        assert row["created_at"].tzinfo is not None
        assert before - timedelta(seconds=5) <= row["created_at"] <= datetime.now(UTC)

    assert [r["id"] for r in db.recent_predictions(limit=2)] == ids[:0:-1]
    assert db.recent_predictions(limit=1)[0]["id"] == ids[-1]


def test_confidence_keeps_float4_precision(clean_db):
    db.log_prediction(5, 5, 0.87654321)
    assert db.recent_predictions()[0]["confidence"] == pytest.approx(0.87654321, rel=1e-6)


def test_insert_logs_its_duration(clean_db, caplog):
    caplog.set_level(logging.INFO, logger="db")
    row_id = db.log_prediction(2, 2, 0.5)
    messages = [r.getMessage() for r in caplog.records if r.name == "db"]
    assert any(m.startswith(f"inserted prediction id={row_id} in ") for m in messages), messages
    assert any(m.endswith(" ms") for m in messages)


# --- validation and constraints -----------------------------------------------------------------

BAD_VALUES = [
    (10, 1, 0.5),
    (-1, 1, 0.5),
    (1, 10, 0.5),
    (1, -1, 0.5),
    (1, 1, 1.5),
    (1, 1, -0.1),
    (1, 1, math.nan),
    (1, 1, math.inf),
    (True, 1, 0.5),
    (1, False, 0.5),
    (1.0, 1, 0.5),
    ("1", 1, 0.5),
    (1, 1, "0.5"),
    (1, 1, True),
    (1, 1, None),
]


@pytest.mark.parametrize(("predicted", "true_label", "confidence"), BAD_VALUES)
def test_log_prediction_rejects_invalid_values(clean_db, predicted, true_label, confidence):
    with pytest.raises(ValueError):
        db.log_prediction(predicted, true_label, confidence)
    assert count_rows(clean_db) == 0


def test_validation_happens_before_touching_the_database(fresh_pg_server):
    db.configure(fresh_pg_server.url)
    fresh_pg_server.stop()
    with pytest.raises(ValueError, match="from 0 to 9"):
        db.log_prediction(10, 1, 0.5)
    with pytest.raises(ValueError, match="confidence"):
        db.log_prediction(1, 1, 1.5)
    with pytest.raises(db.DatabaseUnavailable):  # the valid call does reach for the database
        db.log_prediction(1, 1, 0.5)


@pytest.mark.parametrize(
    ("predicted", "true_label", "confidence"),
    [(10, 1, 0.5), (-1, 1, 0.5), (1, 10, 0.5), (1, -1, 0.5), (1, 1, 1.5), (1, 1, -0.1)]
    + [(1, 1, "NaN")],
)
def test_database_constraints_reject_out_of_range_rows(clean_db, predicted, true_label, confidence):
    with pytest.raises(errors.CheckViolation):
        raw_insert(clean_db, predicted, true_label, confidence)
    assert count_rows(clean_db) == 0


def test_database_requires_every_value(clean_db):
    with pytest.raises(errors.NotNullViolation):
        raw_insert(clean_db, 1, None, 0.5)


# --- SQL injection ------------------------------------------------------------------------------


def test_sql_injection_strings_are_rejected_and_harmless(clean_db):
    db.log_prediction(1, 1, 0.5)
    for args in [(INJECTION, 1, 0.5), (1, INJECTION, 0.5), (1, 1, INJECTION)]:
        with pytest.raises(ValueError):
            db.log_prediction(*args)
    with pytest.raises(ValueError):
        db.log_prediction(1, 1, 0.5, submission_id=INJECTION)
    with pytest.raises(ValueError):
        db.recent_predictions(limit=INJECTION)
    assert table_exists(clean_db)
    assert db.count_predictions() == 1


def test_parameterised_insert_treats_injection_as_a_value(clean_db):
    # Sent as a parameter, the payload is only ever a (malformed) value, never SQL.
    with pytest.raises(errors.InvalidTextRepresentation):
        raw_insert(clean_db, INJECTION, 1, 0.5)
    with pytest.raises(errors.InvalidTextRepresentation):
        raw_insert(clean_db, 1, 1, 0.5, submission_id=INJECTION)
    assert table_exists(clean_db)
    assert count_rows(clean_db) == 0


# --- idempotent retries -------------------------------------------------------------------------


def test_same_submission_id_is_stored_once(clean_db):
    sid = uuid.uuid4()
    first = db.log_prediction(6, 8, 0.75, submission_id=sid)
    assert db.log_prediction(6, 8, 0.75, submission_id=sid) == first
    assert count_rows(clean_db) == 1
    other = db.log_prediction(6, 8, 0.75, submission_id=uuid.uuid4())
    db.log_prediction(6, 8, 0.75)
    db.log_prediction(6, 8, 0.75)
    assert other != first
    assert count_rows(clean_db) == 4  # a new id, and two rows without any id


def test_concurrent_retries_of_one_submission_store_one_row(clean_db):
    sid = uuid.uuid4()
    barrier = threading.Barrier(6)
    results, failures = [], []

    def submit():
        try:
            barrier.wait()
            results.append(db.log_prediction(2, 3, 0.5, submission_id=sid))
        except Exception as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(results) == 6 and len(set(results)) == 1
    assert count_rows(clean_db) == 1


# --- unavailable, hung and busy database ------------------------------------------------------


def assert_unavailable(call, *args, within: float = 5):
    start = time.monotonic()
    with pytest.raises(db.DatabaseUnavailable, match="^database unreachable: ") as info:
        call(*args)
    elapsed = time.monotonic() - start
    assert elapsed < within, f"{call.__name__} took {elapsed:.1f} s to fail"
    assert not isinstance(info.value, db.DatabaseBusy)


def test_stopped_database_fails_fast_and_the_first_save_after_it_is_stored_once(fresh_pg_server):
    db.configure(fresh_pg_server.url)
    db.init_db()
    first = db.log_prediction(1, 2, 0.5)

    fresh_pg_server.stop()
    # The pool still holds a connection to the stopped server when the first call is made.
    sid = uuid.uuid4()
    assert_unavailable(db.log_prediction, 3, 4, 0.5, sid)
    # Known down: every retry answers within a second, whatever the call.
    for call, args in [(db.log_prediction, (3, 4, 0.5, sid)), (db.recent_predictions, ())]:
        assert_unavailable(call, *args, within=1)
    assert_unavailable(db.init_db, within=1)

    fresh_pg_server.start()
    second = db.log_prediction(3, 4, 0.5, submission_id=sid)
    assert db.log_prediction(3, 4, 0.5, submission_id=sid) == second
    assert [r["id"] for r in db.recent_predictions()] == [second, first]

    # A crash (no clean shutdown) while the pool is open: same story.
    fresh_pg_server.stop(mode="immediate")
    assert_unavailable(db.count_predictions)
    fresh_pg_server.start()
    assert db.count_predictions() == 2


def test_server_restart_while_idle_goes_unnoticed(fresh_pg_server):
    db.configure(fresh_pg_server.url)
    db.init_db()
    first = db.log_prediction(1, 1, 0.5)
    fresh_pg_server.stop()
    fresh_pg_server.start()
    # The pool's idle connection died with the old server: it is replaced, not handed out.
    second = db.log_prediction(2, 2, 0.5)
    assert [r["id"] for r in db.recent_predictions()] == [second, first]


def test_database_down_from_the_start(fresh_pg_server):
    fresh_pg_server.stop()
    db.configure(fresh_pg_server.url)
    assert_unavailable(db.init_db)
    fresh_pg_server.start()
    db.init_db()  # creates the table
    db.log_prediction(1, 1, 0.5)
    assert count_rows(fresh_pg_server) == 1


@pytest.fixture
def hung_server_url() -> Iterator[str]:
    """A server that accepts TCP connections and never says a word."""
    proxy = TcpProxy()
    yield proxy.url
    proxy.close()


def run_at_once(count: int, call) -> list[tuple[float, object]]:
    """Run call(n) in *count* threads released together: (seconds taken, result or error)."""
    barrier = threading.Barrier(count)
    outcomes: list[tuple[float, object]] = [(0.0, None)] * count

    def worker(n: int) -> None:
        barrier.wait()
        start = time.monotonic()
        try:
            result: object = call(n)
        except Exception as exc:  # reported by the caller
            result = exc
        outcomes[n] = (time.monotonic() - start, result)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_a_hung_database_answers_every_waiting_call_together(hung_server_url):
    db.configure(hung_server_url)
    outcomes = run_at_once(6, lambda n: db.log_prediction(n, n, 0.5))
    times = sorted(elapsed for elapsed, _ in outcomes)
    for _, error in outcomes:
        assert isinstance(error, db.DatabaseUnavailable), error
        assert not isinstance(error, db.DatabaseBusy)
        assert "timeout" in str(error), error
    # Not one behind the other (3, 6, 9... s): all within the connect timeout, together.
    assert times[-1] < db.CONNECT_TIMEOUT_S + 1.5, times
    assert times[-1] - times[0] < 1, times
    assert_unavailable(db.log_prediction, 1, 1, 0.5, within=1)  # known down: fail fast


def test_a_busy_database_stores_every_row_once(clean_db):
    """40 saves at once, 10 per pooled connection, while a restore-like lock holds the table
    for 3.5 s: each waits its turn, none is told the database is down."""
    assert db.STATEMENT_TIMEOUT_S > 3.5 and db.POOL_MAX_SIZE < 40
    sids = [uuid.uuid4() for _ in range(40)]
    with clean_db.connect() as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        timer = threading.Timer(3.5, locker.execute, args=("COMMIT",))
        timer.start()
        outcomes = run_at_once(40, lambda n: db.log_prediction(n % 10, n % 10, 0.5, sids[n]))
        timer.join()
    assert [result for _, result in outcomes if not isinstance(result, int)] == []
    assert min(elapsed for elapsed, _ in outcomes) >= 3
    with clean_db.connect() as conn:
        stored = conn.execute("SELECT submission_id FROM predictions").fetchall()
    assert sorted(row[0] for row in stored) == sorted(sids)


def test_a_query_over_the_statement_timeout_is_busy_not_down(clean_db, monkeypatch):
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1)
    db.configure(clean_db.url)
    with clean_db.connect() as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(db.DatabaseBusy, match="^database busy: .*longer than 1 s"):
            db.log_prediction(1, 1, 0.5)
        locker.execute("ROLLBACK")
    start = time.monotonic()
    db.log_prediction(2, 2, 0.5)  # no outage was recorded: no fail-fast refusal
    assert time.monotonic() - start < 1
    assert count_rows(clean_db) == 1


# --- configuration and the app's role -----------------------------------------------------------


def test_database_url_wins(clean_db, monkeypatch):
    env = {"DATABASE_URL": clean_db.url, "POSTGRES_HOST": "db.invalid", "POSTGRES_PORT": "1"}
    assert db.resolve_conninfo(env) == clean_db.url
    assert db.resolve_conninfo(env, owner=True) == clean_db.url
    monkeypatch.setenv("DATABASE_URL", clean_db.url)
    monkeypatch.setenv("POSTGRES_HOST", "db.invalid")
    db.configure()  # no conninfo: resolve_conninfo() from the process environment
    db.log_prediction(7, 7, 0.7)
    assert count_rows(clean_db) == 1


def test_the_app_role_reads_and_inserts_and_nothing_else(fresh_pg_server, monkeypatch):
    password = "p@ss w'o:r/d?#%\\"  # would break a hand-formatted URL
    with fresh_pg_server.connect() as conn:
        conn.execute("CREATE DATABASE feedback")
    env = {
        "DATABASE_URL": "",  # empty counts as unset
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(fresh_pg_server.port),
        "POSTGRES_USER": "postgres",  # the owner (trust authentication in these tests)
        "APP_DB_PASSWORD": password,
        "POSTGRES_DB": "feedback",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert db.main(["db.py", "migrate"]) == 0
    assert db.main(["db.py", "migrate"]) == 0  # idempotent

    app_conninfo = db.resolve_conninfo(env)
    db.configure(app_conninfo)
    db.init_db()  # as the app role: checks, changes nothing
    db.log_prediction(4, 4, 0.5, submission_id=(sid := uuid.uuid4()))
    assert db.log_prediction(4, 4, 0.5, submission_id=sid) == db.recent_predictions()[0]["id"]
    with psycopg.connect(app_conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            db.APP_ROLE,
            "feedback",
        )
        for statement in [
            "DROP TABLE predictions",
            "CREATE TABLE t (x int)",
            "SELECT rolpassword FROM pg_authid",
            "DELETE FROM predictions",
            "UPDATE predictions SET true_label = 0",
            "ALTER TABLE predictions ADD COLUMN x int",
        ]:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)
    with fresh_pg_server.connect(dbname="feedback") as conn:
        assert conn.execute("SELECT count(*) FROM predictions").fetchone()[0] == 1

    # The password really is checked: a wrong one is refused.
    db.configure(db.resolve_conninfo({**env, "APP_DB_PASSWORD": "wrong"}))
    with pytest.raises(db.DatabaseUnavailable, match="password authentication failed"):
        db.count_predictions()


def test_postgres_variables_defaults():
    params = conninfo_to_dict(db.resolve_conninfo({"POSTGRES_HOST": "db"}))
    assert params == {"host": "db", "port": "5432", "user": db.APP_ROLE, "dbname": "postgres"}
    owner = conninfo_to_dict(db.resolve_conninfo({"POSTGRES_HOST": "db"}, owner=True))
    assert owner == {**params, "user": "postgres"}


def embedded_postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


@pytest.fixture
def embedded_pgdata(pg_tmp_path):
    pgdata = pg_tmp_path / "data" / "postgres"  # no parent yet, like data/ in a fresh clone
    yield pgdata
    if (pgdata / "postmaster.pid").exists():
        pg_command("pg_ctl", "stop", "-m", "immediate", "-D", str(pgdata), check=False)


@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR is not set")
def test_embedded_default_starts_pgserver_and_keeps_data(embedded_pgdata, caplog):
    caplog.set_level(logging.INFO, logger="db")
    conninfo = db.resolve_conninfo({}, pgdata=embedded_pgdata)
    assert any(
        "embedded" in r.getMessage() and str(embedded_pgdata) in r.getMessage()
        for r in caplog.records
        if r.name == "db"
    )
    assert (embedded_pgdata / "PG_VERSION").exists()
    pid = embedded_postmaster_pid(embedded_pgdata)
    db.configure(conninfo)
    row_id = db.log_prediction(8, 3, 0.4)
    db.close_pool()

    # A second resolution reuses the running server and sees the row.
    db.configure(db.resolve_conninfo({}, pgdata=embedded_pgdata))
    assert embedded_postmaster_pid(embedded_pgdata) == pid
    assert [r["id"] for r in db.recent_predictions()] == [row_id]
    db.close_pool()

    # Stopped meanwhile (`python db.py stop-embedded`, as `make run` does on Ctrl-C): this
    # process starts it again, on the same data.
    assert db.stop_embedded(embedded_pgdata)
    assert not postmasters(embedded_pgdata)
    db.configure(db.resolve_conninfo({}, pgdata=embedded_pgdata))
    assert db.count_predictions() == 1
    restarted_pid = embedded_postmaster_pid(embedded_pgdata)
    assert restarted_pid != pid
    db.close_pool()

    # Stopped (e.g. a reboot): a new app process starts it, on the same data.
    assert db.stop_embedded(embedded_pgdata)
    assert run_app_process(embedded_pgdata, inserts=0) == 1
    assert embedded_postmaster_pid(embedded_pgdata) not in (pid, restarted_pid)


def run_app_process(pgdata: Path, inserts: int) -> int:
    """Run resolve_conninfo + inserts in a new Python process; return the row count it sees."""
    return json.loads(_app_process(pgdata, inserts).communicate(timeout=120)[0])["count"]


def _app_process(pgdata: Path, inserts: int) -> subprocess.Popen[str]:
    code = (
        "import json, sys, db\n"
        f"db.configure(db.resolve_conninfo({{}}, pgdata={str(pgdata)!r}))\n"
        f"for i in range({inserts}): db.log_prediction(i % 10, i % 10, 0.5)\n"
        "print(json.dumps({'count': db.count_predictions()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "POSTGRES_HOST")}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )


@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR is not set")
def test_two_app_processes_share_one_embedded_server(embedded_pgdata):
    embedded_pgdata.parent.mkdir(parents=True)
    procs = [_app_process(embedded_pgdata, inserts=25) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert all(json.loads(out)["count"] >= 25 for out in outputs)
    # One server for both, still running after they exited, with every row of both.
    assert postmasters(embedded_pgdata) == [embedded_postmaster_pid(embedded_pgdata)]
    db.configure(db.resolve_conninfo({}, pgdata=embedded_pgdata))
    assert db.count_predictions() == 50
    assert postmasters(embedded_pgdata) == [embedded_postmaster_pid(embedded_pgdata)]


def postmasters(pgdata: Path) -> list[int]:
    """PIDs of PostgreSQL postmasters (not their children) serving *pgdata*."""
    return [
        proc.pid
        for proc in psutil.process_iter(["name", "cmdline"])
        if proc.info["name"] == "postgres"
        and str(pgdata) in (proc.info["cmdline"] or [])
        and psutil.Process(proc.ppid()).name() != "postgres"
    ]


# --- concurrency --------------------------------------------------------------------------------


def test_concurrent_inserts_from_8_threads(clean_db):
    barrier = threading.Barrier(8)
    ids, failures = [], []

    def worker(n):
        try:
            barrier.wait()
            for i in range(50):
                ids.append(db.log_prediction((n + i) % 10, i % 10, i / 49))
        except Exception as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(ids) == len(set(ids)) == 400
    assert count_rows(clean_db) == 400
    assert db.count_predictions() == 400


def test_log_prediction_rejects_an_invalid_model_name(clean_db):
    for name in ["", "x" * 101, 7]:
        with pytest.raises(ValueError, match="model"):
            db.log_prediction(1, 1, 0.5, model=name)
    assert count_rows(clean_db) == 0


# --- History: counts from the database ----------------------------------------------------------

MODEL_A, MODEL_B = "model.pth@aaaaaaaaaaaa", "model.pth@bbbbbbbbbbbb"
HISTORY_START = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)


@pytest.fixture
def history(clean_db) -> list[tuple]:
    """12,000 answers stored a minute apart, as (created_at, predicted_digit, true_label,
    confidence, model): 2,000 from before models were recorded, 6,000 of model A, then 4,000
    of model B, right nine times in ten."""
    rng = random.Random(16)
    rows = []
    for n in range(12_000):
        model = None if n < 2_000 else MODEL_A if n < 8_000 else MODEL_B
        true_label = rng.randrange(10)
        predicted = true_label if rng.random() < 0.9 else rng.randrange(10)
        rows.append((HISTORY_START + timedelta(minutes=n), predicted, true_label, 0.5, model))
    columns = "created_at, predicted_digit, true_label, confidence, model"
    with (
        clean_db.connect() as conn,
        conn.cursor().copy(f"COPY predictions ({columns}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(row)
    return rows


def of_model(rows: list[tuple], model: str | None) -> list[tuple]:
    """What the History filter *model* should select: None all, "" the unrecorded ones."""
    return [row for row in rows if model is None or (row[4] or "") == model]


def test_models_answering_counts_each_model_latest_first(history):
    def expected(model):
        rows = of_model(history, model)
        right = sum(row[1] == row[2] for row in rows)
        return (model, len(rows), right, rows[0][0], rows[-1][0])

    listed = [tuple(entry.values()) for entry in db.models_answering()]
    assert listed == [expected(MODEL_B), expected(MODEL_A), expected("")]


@pytest.mark.parametrize("model", [None, MODEL_A, MODEL_B, ""], ids=["all", "A", "B", "unrecorded"])
def test_history_counts_are_exactly_those_of_the_rows(history, model):
    rows = of_model(history, model)
    cells = Counter((true_label, predicted) for _, predicted, true_label, _, _ in rows)

    counted = {
        (c["true_label"], c["predicted_digit"]): c["answers"] for c in db.confusion_counts(model)
    }
    assert counted == cells
    assert [tuple(d.values()) for d in db.digit_accuracy(model)] == [
        (digit, sum(n for (t, _), n in cells.items() if t == digit), cells[digit, digit])
        for digit in range(10)
    ]
    mistakes = sorted(
        ((t, p, n) for (t, p), n in cells.items() if t != p), key=lambda c: (-c[2], c[0], c[1])
    )
    assert [tuple(c.values()) for c in db.most_confused(model, limit=5)] == mistakes[:5]
    newest = db.recent_predictions(limit=3, model=model)
    assert [(r["created_at"], r["model"]) for r in newest] == [(r[0], r[4]) for r in rows[:-4:-1]]


def test_accuracy_over_time_per_day_and_per_answers(history):
    def counted(key) -> list[tuple]:
        """(key..., answers, right) for the rows grouped by key(number, row), in time order."""
        answers, right = Counter(), Counter()
        for number, row in enumerate(history, start=1):
            answers[key(number, row)] += 1
            right[key(number, row)] += row[1] == row[2]
        return [(*group, answers[group], right[group]) for group in answers]

    per_day = [tuple(d.values()) for d in db.accuracy_per_day()]
    assert per_day == counted(lambda _, row: (row[0].date(), row[4] or ""))
    # Groups of 70: the 29th (answers 1961-2030) is split where model A takes over.
    per_70 = db.accuracy_per_answers(size=70)
    assert [(g["model"], g["answers"], g["correct"]) for g in per_70] == [
        group[1:] for group in counted(lambda number, row: ((number - 1) // 70, row[4] or ""))
    ]
    assert [g["last_answer"] for g in per_70[27:30]] == [1960, 2000, 2030]
    assert [g["answers"] for g in db.accuracy_per_answers(MODEL_B, size=1000)] == [1000] * 4


def test_csv_export_holds_every_row_of_the_model(history):
    for model in (None, MODEL_B):
        exported = list(csv.DictReader(io.StringIO(db.export_csv(model).decode())))
        rows = of_model(history, model)
        assert [
            (int(e["predicted_digit"]), int(e["true_label"]), float(e["confidence"]), e["model"])
            for e in exported
        ] == [(predicted, label, conf, m or "") for _, predicted, label, conf, m in rows]
    assert list(exported[0]) == [
        "id", "created_at", "predicted_digit", "true_label", "confidence", "model"
    ]  # fmt: skip
