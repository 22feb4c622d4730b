"""PostgreSQL storage of the feedback: one ``predictions`` row per confirmed or corrected digit.

Where the database is comes from the environment (see ``resolve_conninfo``). Every public
function raises ``DatabaseUnavailable`` when the server cannot be reached, and works again
once it is back, without restarting the process.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from dotenv import load_dotenv
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

logger = logging.getLogger("db")

PROJECT_ROOT = Path(__file__).resolve().parent
EMBEDDED_PGDATA = PROJECT_ROOT / "data" / "postgres"
CONNECT_TIMEOUT_S = 3
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4

# Serialises schema creation between processes: concurrent CREATE TABLE IF NOT EXISTS can fail.
_SCHEMA_LOCK_KEY = 0x4D4E495354  # "MNIST"

_SCHEMA_SQL = (
    """
    CREATE TABLE IF NOT EXISTS predictions (
        id bigserial PRIMARY KEY,
        created_at timestamptz NOT NULL DEFAULT now(),
        predicted_digit smallint NOT NULL
            CONSTRAINT predictions_predicted_digit_check CHECK (predicted_digit BETWEEN 0 AND 9),
        true_label smallint NOT NULL
            CONSTRAINT predictions_true_label_check CHECK (true_label BETWEEN 0 AND 9),
        confidence real NOT NULL
            CONSTRAINT predictions_confidence_check CHECK (confidence >= 0 AND confidence <= 1),
        submission_id uuid UNIQUE,
        model text CONSTRAINT predictions_model_check CHECK (char_length(model) BETWEEN 1 AND 100)
    )
    """,
    # Tables created before submission_id existed.
    "ALTER TABLE predictions ADD COLUMN IF NOT EXISTS submission_id uuid UNIQUE",
    # Tables created before the model column existed: their rows keep a NULL model.
    "ALTER TABLE predictions ADD COLUMN IF NOT EXISTS model text"
    " CONSTRAINT predictions_model_check CHECK (char_length(model) BETWEEN 1 AND 100)",
    "CREATE INDEX IF NOT EXISTS predictions_created_at_idx ON predictions (created_at DESC)",
)


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached: stopped, unreachable, or refusing the connection."""


_lock = threading.Lock()
_pool: ConnectionPool | None = None
_conninfo: str | None = None  # set by configure(); None: resolve_conninfo() when the pool opens


def resolve_conninfo(
    environ: Mapping[str, str] | None = None, pgdata: Path | str | None = None
) -> str:
    """Return the connection string to use.

    In order: ``DATABASE_URL``; else, if ``POSTGRES_HOST`` is set, ``POSTGRES_HOST``,
    ``POSTGRES_PORT`` (5432), ``POSTGRES_USER`` (postgres), ``POSTGRES_PASSWORD``,
    ``POSTGRES_DB`` (postgres); else an embedded PostgreSQL (pgserver) whose data lives in
    *pgdata* (default ``data/postgres`` in the project), started if not already running and
    left running for the next process. *environ* defaults to ``os.environ`` after loading the
    project's ``.env`` (variables already set win). Empty values count as unset.
    """
    if environ is None:
        load_dotenv(PROJECT_ROOT / ".env")
        environ = os.environ
    if url := environ.get("DATABASE_URL", "").strip():
        return url
    if host := environ.get("POSTGRES_HOST", "").strip():
        return make_conninfo(
            host=host,
            port=environ.get("POSTGRES_PORT") or "5432",
            user=environ.get("POSTGRES_USER") or "postgres",
            password=environ.get("POSTGRES_PASSWORD") or None,
            dbname=environ.get("POSTGRES_DB") or "postgres",
        )
    return _start_embedded(Path(pgdata) if pgdata is not None else EMBEDDED_PGDATA)


def _start_embedded(pgdata: Path) -> str:
    import pgserver  # only needed without configuration

    logger.info(
        "DATABASE_URL and POSTGRES_HOST are unset: using the embedded PostgreSQL in %s", pgdata
    )
    try:
        # Created here, tolerantly: pgserver checks for the folder, then creates it, outside its
        # lock, so two processes starting at once could fail with FileExistsError.
        pgdata.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: the server outlives this process. pgserver serialises initdb and
        # start-up with an inter-process lock and reuses a server running on the same pgdata.
        server = pgserver.get_server(pgdata, cleanup_mode=None)
        if not (server.pgdata / "postmaster.pid").exists():
            # Stopped since get_server() cached it for this process: start it again.
            server = pgserver.PostgresServer(server.pgdata, cleanup_mode=None)
        return server.get_uri()
    except Exception as exc:
        raise DatabaseUnavailable(
            f"database unreachable: embedded PostgreSQL failed to start in {pgdata}: {exc}"
        ) from exc


def configure(conninfo: str | None = None) -> None:
    """Use *conninfo* from now on (None: ``resolve_conninfo()``); closes the current pool."""
    global _conninfo
    close_pool()
    _conninfo = conninfo


def close_pool() -> None:
    """Close the connection pool; the next database call opens a new one."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.close(timeout=1.0)


def get_pool() -> ConnectionPool:
    """Return the connection pool, opening it (and creating the schema) on first use."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = _open_pool(_conninfo if _conninfo is not None else resolve_conninfo())
        return _pool


def _unavailable(exc: BaseException) -> DatabaseUnavailable:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DatabaseUnavailable(f"database unreachable: {reason}")


def _open_pool(conninfo: str) -> ConnectionPool:
    # Fail fast if connecting. tcp_user_timeout (ms) bounds a send to a vanished host.
    kwargs: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "tcp_user_timeout": CONNECT_TIMEOUT_S * 1000,
    }
    pool = ConnectionPool(
        conninfo,
        kwargs=kwargs,
        min_size=POOL_MIN_SIZE,
        max_size=POOL_MAX_SIZE,
        open=False,
        check=ConnectionPool.check_connection,  # replace connections that died while idle
        timeout=CONNECT_TIMEOUT_S,
        name="db",
    )
    try:
        # One direct attempt first: it reports the real reason (refused, auth...) at once,
        # where the pool would retry until its timeout and only say that it timed out.
        psycopg.connect(conninfo, **kwargs).close()
        pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        with pool.connection() as conn:
            _create_schema(conn)
    except BaseException as exc:
        pool.close(timeout=1.0)
        if isinstance(exc, psycopg.OperationalError):
            raise _unavailable(exc) from exc
        raise
    return pool


def _discard_pool(pool: ConnectionPool) -> None:
    """Drop a pool whose server went away, so the next call reconnects at once.

    A kept pool would retry in the background with a growing back-off and could lag behind a
    server that is back.
    """
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
    pool.close(timeout=1.0)


@contextmanager
def _connection() -> Iterator[psycopg.Connection]:
    """A pooled connection in a transaction; connection failures become DatabaseUnavailable."""
    pool = get_pool()
    try:
        with pool.connection() as conn:
            yield conn
    except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout and PoolClosed
        _discard_pool(pool)
        raise _unavailable(exc) from exc


def _create_schema(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
    for statement in _SCHEMA_SQL:
        conn.execute(statement)


def init_db() -> None:
    """Create the ``predictions`` table if missing, or add columns missing from an older one.

    The pool also does this when it opens, so calling it is optional; it is idempotent.
    """
    with _connection() as conn:
        _create_schema(conn)


def _check_digit(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int from 0 to 9, got {value!r}")
    if not 0 <= value <= 9:
        raise ValueError(f"{name} must be from 0 to 9, got {value!r}")
    return int(value)


def _check_confidence(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"confidence must be a number from 0 to 1, got {value!r}")
    result = float(value)
    if not (math.isfinite(result) and 0.0 <= result <= 1.0):
        raise ValueError(f"confidence must be from 0 to 1, got {value!r}")
    # The column is a 4-byte real: round here, or PostgreSQL rejects values below its range
    # (e.g. 1e-46) as an underflow instead of storing them as 0.
    return struct.unpack("f", struct.pack("f", result))[0]


MODEL_NAME_MAX = 100  # characters in predictions.model


def log_prediction(
    predicted_digit: int,
    true_label: int,
    confidence: float,
    submission_id: uuid.UUID | None = None,
    model: str | None = None,
) -> int:
    """Store one answer and return its row id.

    *model* names the model that made the prediction (1 to 100 characters), or None.
    A *submission_id* already stored (a retried submission) stores nothing and returns the
    existing row's id. Invalid values raise ValueError before the database is touched.
    """
    if submission_id is not None and not isinstance(submission_id, uuid.UUID):
        raise ValueError(f"submission_id must be a uuid.UUID or None, got {submission_id!r}")
    if model is not None and not (isinstance(model, str) and 1 <= len(model) <= MODEL_NAME_MAX):
        raise ValueError(f"model must be a str of 1 to {MODEL_NAME_MAX} characters or None")
    params = (
        _check_digit("predicted_digit", predicted_digit),
        _check_digit("true_label", true_label),
        _check_confidence(confidence),
        submission_id,
        model,
    )
    start = time.perf_counter()
    with _connection() as conn:
        row = conn.execute(
            "INSERT INTO predictions"
            " (predicted_digit, true_label, confidence, submission_id, model)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (submission_id) DO NOTHING RETURNING id",
            params,
        ).fetchone()
        inserted = row is not None
        if not inserted:
            row = conn.execute(
                "SELECT id FROM predictions WHERE submission_id = %s", (submission_id,)
            ).fetchone()
    assert row is not None
    elapsed_ms = (time.perf_counter() - start) * 1000
    if inserted:
        logger.info("inserted prediction id=%d in %.1f ms", row[0], elapsed_ms)
    else:
        logger.info("retried submission %s: already stored as id=%d", submission_id, row[0])
    return row[0]


# --- History: what the stored answers say, counted by the database ---------------------------

# The rows of one model: None selects every row; "" the rows stored before the model was
# recorded (model IS NULL). A constant clause with one named parameter, %(model)s.
_OF_MODEL = "(%(model)s::text IS NULL OR coalesce(model, '') = %(model)s)"
_CORRECT = "count(*) FILTER (WHERE predicted_digit = true_label)"


def _select(query: str, **params: Any) -> list[dict[str, Any]]:
    with _connection() as conn:
        return conn.cursor(row_factory=dict_row).execute(query, params).fetchall()


def recent_predictions(limit: int = 100, model: str | None = None) -> list[dict[str, Any]]:
    """The *limit* newest rows (of *model*, see ``models_answering``), newest first, as dicts
    with keys id, created_at, predicted_digit, true_label, confidence, model."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    return _select(
        "SELECT id, created_at, predicted_digit, true_label, confidence, model FROM predictions"
        f" WHERE {_OF_MODEL} ORDER BY created_at DESC, id DESC LIMIT %(limit)s",
        model=model,
        limit=limit,
    )


def count_predictions() -> int:
    """Number of stored rows."""
    with _connection() as conn:
        row = conn.execute("SELECT count(*) FROM predictions").fetchone()
    assert row is not None
    return row[0]


def models_answering() -> list[dict[str, Any]]:
    """Every model that has stored answers, the latest to answer first: dicts with keys model
    ("" for answers stored before the model was recorded), answers, correct, first_at,
    last_at."""
    return _select(
        f"SELECT coalesce(model, '') AS model, count(*) AS answers, {_CORRECT} AS correct,"
        " min(created_at) AS first_at, max(created_at) AS last_at"
        " FROM predictions GROUP BY 1 ORDER BY last_at DESC, 1"
    )


def confusion_counts(model: str | None = None) -> list[dict[str, Any]]:
    """The confusion matrix as its non-zero cells: dicts with keys true_label,
    predicted_digit, answers, in order of true label, then predicted digit."""
    return _select(
        "SELECT true_label, predicted_digit, count(*) AS answers FROM predictions"
        f" WHERE {_OF_MODEL} GROUP BY 1, 2 ORDER BY 1, 2",
        model=model,
    )


def digit_accuracy(model: str | None = None) -> list[dict[str, Any]]:
    """For each true label with answers, in order: dicts with keys true_label, answers,
    correct (how many the model read right)."""
    return _select(
        f"SELECT true_label, count(*) AS answers, {_CORRECT} AS correct FROM predictions"
        f" WHERE {_OF_MODEL} GROUP BY 1 ORDER BY 1",
        model=model,
    )


def most_confused(model: str | None = None, limit: int = 5) -> list[dict[str, Any]]:
    """The *limit* most frequent mistakes, most frequent first: dicts with keys true_label,
    predicted_digit, answers."""
    return _select(
        "SELECT true_label, predicted_digit, count(*) AS answers FROM predictions"
        f" WHERE predicted_digit <> true_label AND {_OF_MODEL}"
        " GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT %(limit)s",
        model=model,
        limit=limit,
    )


def accuracy_per_day(model: str | None = None) -> list[dict[str, Any]]:
    """Answers per day (UTC) and model, in order of time: dicts with keys day (a date),
    model ("" if not recorded), answers, correct."""
    return _select(
        f"SELECT (created_at AT TIME ZONE 'UTC')::date AS day, coalesce(model, '') AS model,"
        f" count(*) AS answers, {_CORRECT} AS correct FROM predictions WHERE {_OF_MODEL}"
        " GROUP BY 1, 2 ORDER BY 1, min(created_at)",
        model=model,
    )


def accuracy_per_answers(model: str | None = None, size: int = 50) -> list[dict[str, Any]]:
    """The answers in order of time, in groups of *size* (a group is split where the model
    changes), in order: dicts with keys last_answer (the number of the group's last answer,
    from 1), model ("" if not recorded), answers, correct, first_at, last_at."""
    return _select(
        "SELECT max(n) AS last_answer, model, count(*) AS answers, sum(correct) AS correct,"
        " min(created_at) AS first_at, max(created_at) AS last_at"
        " FROM (SELECT row_number() OVER (ORDER BY created_at, id) AS n,"
        "       coalesce(model, '') AS model, (predicted_digit = true_label)::int AS correct,"
        f"      created_at FROM predictions WHERE {_OF_MODEL}) AS numbered"
        " GROUP BY (n - 1) / %(size)s, model ORDER BY 1",
        model=model,
        size=size,
    )


def export_csv(model: str | None = None) -> bytes:
    """Every row (of *model*), oldest first, as CSV (UTF-8) with a header line of the
    column names."""
    with _connection() as conn, conn.cursor() as cur:
        copy_sql = (
            "COPY (SELECT id, created_at, predicted_digit, true_label, confidence, model"
            f" FROM predictions WHERE {_OF_MODEL} ORDER BY created_at, id)"
            " TO STDOUT WITH (FORMAT csv, HEADER)"
        )
        with cur.copy(copy_sql, {"model": model}) as copy:
            return b"".join(bytes(chunk) for chunk in copy)
