"""PostgreSQL storage of the feedback: one ``predictions`` row per confirmed or corrected digit,
and in ``drawings`` the drawing behind it (``Drawing``), stored in the same transaction.

Where the database is comes from the environment (see ``resolve_conninfo``). The tables are
schema.py's: ``python db.py migrate``, run with the owner's credentials, creates or upgrades
them and the app's role, which may only read and insert answers and insert their drawings
(``APP_ROLE``).

Errors every public function may raise, besides ValueError for invalid arguments:

- ``DatabaseUnavailable``: the server cannot be reached (stopped, unreachable, refusing the
  connection). While it is known to be down (db_health.py), calls fail within ``FAIL_FAST_S``;
  the first call after it is back goes through. psycopg_pool reconnects by itself; nothing
  restarts the process.
- ``DatabaseBusy`` (a DatabaseUnavailable): the server is there but did not answer in time (every
  pooled connection in use for ``BUSY_WAIT_S``, a query over ``STATEMENT_TIMEOUT_S``, a
  deadlock). Nothing was stored; retrying later is safe.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

import db_health
import embedded_pg
import schema
import settings
from db_health import DatabaseBusy, DatabaseUnavailable

# Defined in schema.py, used as db.<name> by the app, drawings.py and the tests.
from schema import MAX_POINTS, MAX_STROKE_POINTS, MAX_STROKES, Drawing, DrawingTooLarge  # noqa: F401
from settings import APP_ROLE  # the app's login: see migrate() for what it may do

logger = logging.getLogger("db")

CONNECT_TIMEOUT_S = 3  # one connection attempt (psycopg's minimum is 2 s)
STATEMENT_TIMEOUT_S = 5  # one query, lock waits included (e.g. during a restore)
BUSY_WAIT_S = 10  # how long a call waits for a free pooled connection on a healthy server
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4
_WAIT_SLICE_S = 0.25  # a waiting call checks this often whether the server went down meanwhile

# --- where the database is ------------------------------------------------------------------


def resolve_conninfo(
    environ: Mapping[str, str] | None = None,
    pgdata: Path | str | None = None,
    *,
    owner: bool = False,
) -> str:
    """Return the connection string of the app (or, with *owner*, of the schema's owner).

    In order: ``DATABASE_URL`` (for both); else, if ``POSTGRES_HOST`` is set, ``POSTGRES_HOST``,
    ``POSTGRES_PORT`` (5432), ``POSTGRES_DB`` (postgres) as ``APP_DB_USER`` (``APP_ROLE``) with
    ``APP_DB_PASSWORD``, or as the owner ``POSTGRES_USER`` (postgres) with ``POSTGRES_PASSWORD``;
    else an embedded PostgreSQL (pgserver) whose data lives in *pgdata* (default
    ``embedded_pg.data_dir()``: ``data/postgres`` in the project, elsewhere as root), started if not
    already running and left running for the next process, and migrated (its superuser is the
    owner; the app connects as ``APP_ROLE``).
    Each variable is read by settings.py, from *environ* if given, else from ``os.environ`` after
    loading the project's ``.env`` (variables already set win). Empty values count as unset.
    """
    if environ is None:
        environ = settings.environment()
    if url := settings.database_url(environ):
        return url
    if host := settings.postgres_host(environ):
        if owner:
            user, password = settings.postgres_user(environ), settings.postgres_password(environ)
        else:
            user, password = settings.app_db_user(environ), settings.app_db_password(environ)
        return make_conninfo(
            host=host,
            port=settings.postgres_port(environ),
            user=user,
            password=password,
            dbname=settings.postgres_db(environ),
        )
    superuser = _start_embedded(Path(pgdata) if pgdata is not None else None)
    if owner:
        return superuser
    migrate(superuser)  # trust authentication: the app role needs no password
    return make_conninfo(superuser, user=APP_ROLE)


def _start_embedded(pgdata: Path | None) -> str:
    pgdata = embedded_pg.data_dir() if pgdata is None else pgdata
    logger.info(
        "DATABASE_URL and POSTGRES_HOST are unset: using the embedded PostgreSQL in %s", pgdata
    )
    try:
        return embedded_pg.start(pgdata)
    except Exception as exc:
        raise DatabaseUnavailable(
            f"database unreachable: embedded PostgreSQL failed to start in {pgdata}: {exc}"
        ) from exc


# --- the tables (schema.py) and the app's role, as the owner --------------------------------


def migrate(
    owner_conninfo: str, app_role: str | None = APP_ROLE, app_password: str | None = None
) -> None:
    """As the schema's owner: create or upgrade the table, then (unless *app_role* is None or
    the owner itself) create *app_role* if missing, set its password if given, and grant it
    SELECT and INSERT on ``predictions``, INSERT on ``drawings``, SELECT on the model
    versions, and nothing else.
    Idempotent; safe to run at once from several processes."""
    try:
        with psycopg.connect(owner_conninfo, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            schema.create(conn)
            if app_role is None or app_role == conn.info.user:
                return
            schema.grant_app_role(conn, app_role, app_password)
    except psycopg.OperationalError as exc:
        raise db_health.unavailable(exc) from exc
    logger.info(
        "migrated the schema; %s may read and insert predictions, insert drawings, read versions",
        app_role,
    )


def init_db() -> None:
    """Make sure the ``predictions`` table is there and current.

    As its owner (or a role that may create it: tests, a server of your own) this creates or
    upgrades it; as the app role it only checks that ``python db.py migrate`` has been run.
    Idempotent.
    """
    with _connection() as conn:
        row = conn.execute(
            "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class"
            " WHERE oid = to_regclass('predictions')"
        ).fetchone()
        if row is not None and not row[0]:
            return  # migrated by its owner
        try:
            schema.create(conn)
        except errors.InsufficientPrivilege as exc:
            raise RuntimeError(
                f"the predictions table is missing and {conn.info.user} may not create it: run"
                " `python db.py migrate` with the owner's credentials (POSTGRES_USER/PASSWORD)"
            ) from exc


def check_connection_budget(conn: psycopg.Connection | None = None) -> int:
    """Raise RuntimeError unless the pools of all app replicas fit in the server's connections.

    Replicas: ``APP_REPLICAS`` (the stack passes the count it runs; 1 if unset), plus one that a
    rolling update (``order: start-first``) runs beside them; each pool opens up to
    ``POOL_MAX_SIZE``. The server lets non-superusers have ``max_connections`` minus
    ``superuser_reserved_connections`` (and ``reserved_connections``, PostgreSQL 16+), read
    from the settings: what the server allows, not what happens to be in use now. Returns that
    limit. Uses *conn*, else a pooled connection."""
    if conn is None:
        with _connection() as pooled:
            return check_connection_budget(pooled)
    replicas = settings.app_replicas()  # a settings.SettingError (RuntimeError) if not a number
    if replicas is None:
        replicas = 1
    (limit,) = conn.execute(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
        " - coalesce(current_setting('reserved_connections', true)::int, 0)"
    ).fetchone()
    needed = (replicas + 1) * POOL_MAX_SIZE
    if needed > limit:
        raise RuntimeError(
            f"{replicas} app replicas (APP_REPLICAS) + 1 during a rolling update, each with a"
            f" pool of up to {POOL_MAX_SIZE} connections (db.POOL_MAX_SIZE), need {needed}"
            f" connections, but PostgreSQL allows only {limit} (max_connections minus the"
            " reserved ones): lower APP_REPLICAS or raise max_connections"
        )
    return limit


# --- the pool (what its connection attempts say about the server: db_health.py) ------------


_lock = threading.Lock()  # guards _pool and _conninfo only: never held while connecting
_pool: ConnectionPool | None = None
_conninfo: str | None = None  # set by configure(); None: resolve_conninfo() when the pool opens


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
    db_health.health.connected()  # forget what the old pool saw


def _connect_kwargs() -> dict[str, Any]:
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        # Bounds a send to a vanished host (ms); the server bounds every query.
        "tcp_user_timeout": CONNECT_TIMEOUT_S * 1000,
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_S * 1000}",
    }


def get_pool() -> ConnectionPool:
    """Return the connection pool, created on first use; it connects in the background."""
    global _pool
    if (pool := _pool) is not None:
        return pool
    conninfo = _conninfo if _conninfo is not None else resolve_conninfo()
    try:
        conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"invalid database connection string: {exc}") from None
    with _lock:
        if _pool is None:
            _pool = ConnectionPool(
                conninfo,
                kwargs=_connect_kwargs(),
                connection_class=db_health.TrackedConnection,
                min_size=POOL_MIN_SIZE,
                max_size=POOL_MAX_SIZE,
                open=False,
                check=ConnectionPool.check_connection,  # replace connections that died idle
                # Give up a failing reconnection soon: the next call asks for a new one at once,
                # instead of waiting out a back-off that grows while the server is down.
                reconnect_timeout=2 * CONNECT_TIMEOUT_S,
                name="db",
            )
            _pool.open(wait=False)
        return _pool


def _getconn(pool: ConnectionPool) -> psycopg.Connection:
    """A pooled connection; waits up to BUSY_WAIT_S while the server is up and busy, but stops
    as soon as a connection attempt fails (the server went down)."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        try:
            return pool.getconn(timeout=max(0.01, min(_WAIT_SLICE_S, deadline - time.monotonic())))
        except PoolTimeout:
            pass
        except PoolClosed as exc:  # closed by configure() in another thread
            raise db_health.unavailable(exc) from exc
        if (reason := db_health.health.down) is not None:
            raise DatabaseUnavailable(f"database unreachable: {reason}")
        if time.monotonic() >= deadline:
            raise DatabaseBusy(
                f"database busy: no free connection within {BUSY_WAIT_S} s"
                f" ({POOL_MAX_SIZE} connections, all in use)"
            )


@contextmanager
def _connection() -> Iterator[psycopg.Connection]:
    """A pooled connection in a transaction; failures become DatabaseUnavailable/DatabaseBusy."""
    pool = get_pool()
    db_health.health.ensure_up(pool.conninfo, _connect_kwargs())
    conn = _getconn(pool)
    try:
        with conn:  # commits, or rolls back on an error (as pool.connection() does)
            yield conn
    except (errors.QueryCanceled, errors.LockNotAvailable) as exc:
        raise DatabaseBusy(
            f"database busy: a query took longer than {STATEMENT_TIMEOUT_S} s"
            f" ({db_health.reason(exc)})"
        ) from exc
    except errors.TransactionRollback as exc:  # deadlock, serialization failure
        raise DatabaseBusy(f"database busy: {db_health.reason(exc)}") from exc
    except psycopg.OperationalError as exc:
        if db_health.server_gone(exc, conn):
            db_health.health.failed(exc)
        raise db_health.unavailable(exc) from exc
    finally:
        pool.putconn(conn)


# --- rows ---------------------------------------------------------------------------------


def log_prediction(
    predicted_digit: int,
    true_label: int,
    confidence: float,
    submission_id: uuid.UUID | None = None,
    model: str | None = None,
    drawing: Drawing | None = None,
    shadow_model: str | None = None,
    shadow_digit: int | None = None,
    shadow_confidence: float | None = None,
) -> int:
    """Store one answer and return its row id.

    *model* names the model that made the prediction (1 to 100 characters), or None.
    *drawing*, if given, is stored in ``drawings`` in the same transaction: both or neither.
    *shadow_model*, *shadow_digit*, *shadow_confidence*: what the shadow model (named as *model*
    names the live one) made of the same drawing, never shown; all three or none.
    A *submission_id* already stored (a retried submission) stores nothing and returns the
    existing row's id. Invalid values raise ValueError before the database is touched.
    """
    if drawing is not None and not isinstance(drawing, Drawing):
        raise ValueError(f"drawing must be a db.Drawing or None, got {type(drawing).__name__}")
    if submission_id is not None and not isinstance(submission_id, uuid.UUID):
        raise ValueError(f"submission_id must be a uuid.UUID or None, got {submission_id!r}")
    shadow = (shadow_model, shadow_digit, shadow_confidence)
    if shadow != (None,) * 3:
        if None in shadow:
            raise ValueError("shadow_model, shadow_digit and shadow_confidence go together")
        shadow = (
            _check_model_name("shadow_model", shadow_model),
            schema.check_digit("shadow_digit", shadow_digit),
            schema.check_confidence(shadow_confidence),
        )
    params = (
        schema.check_digit("predicted_digit", predicted_digit),
        schema.check_digit("true_label", true_label),
        schema.check_confidence(confidence),
        submission_id,
        model if model is None else _check_model_name("model", model),
        *shadow,
    )
    start = time.perf_counter()
    with _connection() as conn:
        row = conn.execute(
            "INSERT INTO predictions (predicted_digit, true_label, confidence, submission_id,"
            " model, shadow_model, shadow_digit, shadow_confidence)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (submission_id) DO NOTHING RETURNING id",
            params,
        ).fetchone()
        inserted = row is not None
        if not inserted:
            row = conn.execute(
                "SELECT id FROM predictions WHERE submission_id = %s", (submission_id,)
            ).fetchone()
        elif drawing is not None:
            _insert_drawing(conn, row[0], drawing)
    assert row is not None
    elapsed_ms = (time.perf_counter() - start) * 1000
    if inserted:
        logger.info("inserted prediction id=%d in %.1f ms", row[0], elapsed_ms)
    else:
        logger.info("retried submission %s: already stored as id=%d", submission_id, row[0])
    return row[0]


def _check_model_name(name: str, value: object) -> str:
    if not (isinstance(value, str) and 1 <= len(value) <= schema.MODEL_NAME_MAX):
        raise ValueError(f"{name} must be a str of 1 to {schema.MODEL_NAME_MAX} characters or None")
    return value


def _insert_drawing(conn: psycopg.Connection, prediction_id: int, drawing: Drawing) -> None:
    try:
        conn.execute(
            "INSERT INTO drawings (prediction_id, strokes, canvas_size, brush_width, image)"
            " VALUES (%s, %s, %s, %s, %s)",
            (
                prediction_id,
                Jsonb(drawing.strokes),
                drawing.canvas_size,
                drawing.brush_width,
                drawing.image,
            ),
        )
    except errors.UndefinedTable as exc:
        raise RuntimeError(
            "the drawings table is missing: run `python db.py migrate` with the owner's"
            " credentials (POSTGRES_USER/PASSWORD), or set STORE_DRAWINGS=false"
        ) from exc


# --- History: what the stored answers say, counted by the database ---------------------------

# The rows of one model: None selects every row; "" the rows stored before the model was
# recorded (model IS NULL). A constant clause with one named parameter, %(model)s.
_OF_MODEL = "(%(model)s::text IS NULL OR coalesce(model, '') = %(model)s)"
_CORRECT = "count(*) FILTER (WHERE predicted_digit = true_label)"


def connection() -> contextlib.AbstractContextManager[psycopg.Connection]:
    """A pooled connection in a transaction, for other modules' queries (registry/store.py,
    registry/live.py); failures raise DatabaseUnavailable or DatabaseBusy."""
    return _connection()


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


def learning_attempts(limit: int = 20) -> list[dict[str, Any]]:
    """The feedback loop's *limit* newest attempts (learner.py), newest first, as dicts with
    keys id, started_at, finished_at, state, answers, new_answers, candidate, message and
    table (the promotion's comparison as printed, or None)."""
    return _select(
        "SELECT id, started_at, finished_at, state, answers, new_answers, candidate, message,"
        " report ->> 'table' AS table FROM learning_attempts ORDER BY id DESC LIMIT %(limit)s",
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


def shadow_pairs() -> list[dict[str, Any]]:
    """The live model against the shadow candidate on the same drawings: for each (live model,
    shadow model) pair with answers, the latest to answer first, dicts with keys model ("" if not
    recorded), shadow_model, answers, live_right, shadow_right, only_live (drawings only the
    live model read right), only_shadow, first_at, last_at."""
    live_right, shadow_right = "predicted_digit = true_label", "shadow_digit = true_label"
    return _select(
        "SELECT coalesce(model, '') AS model, shadow_model, count(*) AS answers,"
        f" count(*) FILTER (WHERE {live_right}) AS live_right,"
        f" count(*) FILTER (WHERE {shadow_right}) AS shadow_right,"
        f" count(*) FILTER (WHERE {live_right} AND NOT {shadow_right}) AS only_live,"
        f" count(*) FILTER (WHERE {shadow_right} AND NOT {live_right}) AS only_shadow,"
        " min(created_at) AS first_at, max(created_at) AS last_at"
        " FROM predictions WHERE shadow_model IS NOT NULL"
        " GROUP BY 1, 2 ORDER BY last_at DESC, 1, 2"
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


def export_drawings(conninfo: str, out: IO[str]) -> int:
    """Write every answer that has its drawing to *out* as JSON Lines, oldest first, and return
    how many. Each line: prediction_id, submission_id, created_at, predicted_digit, true_label,
    confidence, model, strokes, canvas_size, brush_width, image (base64 of the 784 bytes).
    Needs a role that may read ``drawings`` (the owner: the app's role may only insert)."""
    count = 0
    try:
        conn = psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        raise db_health.unavailable(exc) from exc
    with (
        conn,
        conn.cursor("export_drawings", row_factory=dict_row) as cur,  # server-side: streamed
    ):
        cur.execute(
            "SELECT p.id AS prediction_id, p.submission_id, p.created_at, p.predicted_digit,"
            " p.true_label, p.confidence, p.model, d.strokes, d.canvas_size, d.brush_width,"
            " d.image FROM predictions p JOIN drawings d ON d.prediction_id = p.id"
            " ORDER BY p.id"
        )
        for row in cur:
            row["submission_id"] = row["submission_id"] and str(row["submission_id"])
            row["created_at"] = row["created_at"].isoformat()
            row["image"] = base64.b64encode(row["image"]).decode("ascii")
            out.write(json.dumps(row, separators=(",", ":")) + "\n")
            count += 1
    return count


def main(argv: list[str]) -> int:
    """``python db.py migrate``: create or upgrade the schema and the app's role, as the owner
    (``resolve_conninfo(owner=True)``), the role's password from ``APP_DB_PASSWORD``.
    ``python db.py stop-embedded``: stop the embedded PostgreSQL of ``make run``, if it runs.
    ``python db.py export-drawings FILE``: the stored drawings as JSON Lines (``-``: stdout),
    read as the owner."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    if len(argv) == 3 and argv[1] == "export-drawings":
        return _export_drawings_to(argv[2])
    command = argv[1] if len(argv) == 2 else ""
    if command == "migrate":
        owner = resolve_conninfo(owner=True)
        app_role = settings.app_db_user()
        if settings.database_url() is not None:
            app_role = None  # the app connects with DATABASE_URL, as the owner
        # deploy/stack-deploy.sh passes APP_REPLICAS: refuse before deploying (a bad value too).
        try:
            if settings.app_replicas() is not None:
                with psycopg.connect(owner, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                    logger.info("connections for the app: %d", check_connection_budget(conn))
        except RuntimeError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 1
        migrate(owner, app_role, settings.app_db_password())
        return 0
    if command == "stop-embedded":
        if embedded_pg.stop():
            print(f"stopped the embedded PostgreSQL in {embedded_pg.data_dir()}")
        return 0
    print("usage: python db.py migrate | stop-embedded | export-drawings FILE", file=sys.stderr)
    return 2


def _export_drawings_to(target: str) -> int:
    owner = resolve_conninfo(owner=True)
    if target == "-":
        count = export_drawings(owner, sys.stdout)
    else:
        # Written beside the target, then renamed: an interrupted export leaves no half file.
        path = Path(target)
        partial = path.with_name(path.name + ".partial")
        try:
            with partial.open("w", encoding="utf-8") as out:
                count = export_drawings(owner, out)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
    print(f"exported {count} drawings to {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
