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
        submission_id uuid UNIQUE
    )
    """,
    # Tables created before submission_id existed.
    "ALTER TABLE predictions ADD COLUMN IF NOT EXISTS submission_id uuid UNIQUE",
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


def log_prediction(
    predicted_digit: int,
    true_label: int,
    confidence: float,
    submission_id: uuid.UUID | None = None,
) -> int:
    """Store one answer and return its row id.

    A *submission_id* already stored (a retried submission) stores nothing and returns the
    existing row's id. Invalid values raise ValueError before the database is touched.
    """
    if submission_id is not None and not isinstance(submission_id, uuid.UUID):
        raise ValueError(f"submission_id must be a uuid.UUID or None, got {submission_id!r}")
    params = (
        _check_digit("predicted_digit", predicted_digit),
        _check_digit("true_label", true_label),
        _check_confidence(confidence),
        submission_id,
    )
    start = time.perf_counter()
    with _connection() as conn:
        row = conn.execute(
            "INSERT INTO predictions (predicted_digit, true_label, confidence, submission_id)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (submission_id) DO NOTHING RETURNING id",
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


def recent_predictions(limit: int = 100) -> list[dict[str, Any]]:
    """The *limit* newest rows, newest first, as dicts with keys id, created_at,
    predicted_digit, true_label, confidence."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    with _connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        return cur.execute(
            "SELECT id, created_at, predicted_digit, true_label, confidence FROM predictions"
            " ORDER BY created_at DESC, id DESC LIMIT %s",
            (limit,),
        ).fetchall()


def count_predictions() -> int:
    """Number of stored rows."""
    with _connection() as conn:
        row = conn.execute("SELECT count(*) FROM predictions").fetchone()
    assert row is not None
    return row[0]
