"""PostgreSQL storage of the feedback: one ``predictions`` row per confirmed or corrected digit,
and in ``drawings`` the drawing behind it (``Drawing``), stored in the same transaction.

Where the database is comes from the environment (see ``resolve_conninfo``). The schema is this
module's alone: ``python db.py migrate``, run with the owner's credentials, creates or upgrades
the tables and the app's role, which may only read and insert answers and insert their
drawings (``APP_ROLE``).

Errors every public function may raise, besides ValueError for invalid arguments:

- ``DatabaseUnavailable``: the server cannot be reached (stopped, unreachable, refusing the
  connection). While it is known to be down, calls fail within ``FAIL_FAST_S``; the first call
  after it is back goes through. psycopg_pool reconnects by itself; nothing restarts the process.
- ``DatabaseBusy`` (a DatabaseUnavailable): the server is there but did not answer in time (every
  pooled connection in use for ``BUSY_WAIT_S``, a query over ``STATEMENT_TIMEOUT_S``, a
  deadlock). Nothing was stored; retrying later is safe.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import numbers
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

import embedded_pg
import settings
from settings import APP_ROLE  # the app's login: see migrate() for what it may do

logger = logging.getLogger("db")

CONNECT_TIMEOUT_S = 3  # one connection attempt (psycopg's minimum is 2 s)
STATEMENT_TIMEOUT_S = 5  # one query, lock waits included (e.g. during a restore)
BUSY_WAIT_S = 10  # how long a call waits for a free pooled connection on a healthy server
FAIL_FAST_S = 0.5  # while the server is known down, how long a call waits for a new attempt
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4
_WAIT_SLICE_S = 0.25  # a waiting call checks this often whether the server went down meanwhile

# Limits of a stored drawing (see Drawing and the README, "The drawings"). A digit on the 280x280
# canvas is 1-4 strokes of 20-150 points (one point per pointer event); a slow, shaky 0 drawn for
# 5 s at 120 Hz, 600. These leave room for any honest drawing and bound a row to ~250 kB.
MAX_STROKES = 100  # strokes per drawing
MAX_STROKE_POINTS = 2_000  # points per stroke
MAX_POINTS = 10_000  # points per drawing, all strokes together
MIN_CANVAS_SIZE, MAX_CANVAS_SIZE = 28, 2_000  # side of the square canvas, px
IMAGE_BYTES = 28 * 28  # the model's input, uint8


def _none_in(column: str, path: str, vars: bool = False) -> str:
    """SQL: true when the strict jsonpath *path* finds nothing in *column*. Structural errors (a
    stroke that is not an array, ...) count as found: the CHECK fails instead of erroring out.
    With *vars*: the path may end in a filter comparing @ to $size (the canvas_size)."""
    if vars:
        path += " || @ < -$size || @ > 2 * $size)"
    variables = "jsonb_build_object('size', canvas_size)" if vars else "'{}'"
    return f"NOT coalesce(jsonb_path_exists({column}, 'strict {path}', {variables}, true), true)"


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
    # Model versions (versions.py): every trained model's weights, by the SHA-256 of its file.
    """
    CREATE TABLE IF NOT EXISTS model_versions (
        sha256 text PRIMARY KEY
            CONSTRAINT model_versions_sha256_check CHECK (sha256 ~ '^[0-9a-f]{64}$'),
        created_at timestamptz NOT NULL DEFAULT now(),
        weights bytea NOT NULL,
        info jsonb NOT NULL DEFAULT '{}'
    )
    """,
    # Which version is live: the newest row (versions.py).
    """
    CREATE TABLE IF NOT EXISTS model_promotions (
        id bigserial PRIMARY KEY,
        sha256 text NOT NULL REFERENCES model_versions (sha256),
        promoted_at timestamptz NOT NULL DEFAULT now(),
        action text NOT NULL CONSTRAINT model_promotions_action_check
            CHECK (action IN ('initial', 'promote', 'rollback')),
        report jsonb NOT NULL DEFAULT '{}'
    )
    """,
    # The drawing behind an answer (see Drawing), stored with it in one transaction. Answers
    # stored before this table existed, or with STORE_DRAWINGS off, have none. The CHECKs are
    # the last line of defence behind Drawing's own checks, for writers other than this module.
    f"""
    CREATE TABLE IF NOT EXISTS drawings (
        prediction_id bigint PRIMARY KEY REFERENCES predictions (id) ON DELETE CASCADE,
        strokes jsonb NOT NULL CONSTRAINT drawings_strokes_check CHECK (
            coalesce(jsonb_path_query_first(strokes, 'strict $.size()', '{{}}', true)::int, 0)
                BETWEEN 1 AND {MAX_STROKES}
            AND {_none_in("strokes", '$[*] ? (@.type() != "array" || @.size() < 1)')}
            AND {_none_in("strokes", f"$[*] ? (@.size() > {MAX_STROKE_POINTS})")}
            AND jsonb_array_length(jsonb_path_query_array(strokes, 'strict $[*][*]', '{{}}', true))
                <= {MAX_POINTS}
        ),
        canvas_size smallint NOT NULL CONSTRAINT drawings_canvas_size_check
            CHECK (canvas_size BETWEEN {MIN_CANVAS_SIZE} AND {MAX_CANVAS_SIZE}),
        brush_width real NOT NULL CONSTRAINT drawings_brush_width_check
            CHECK (brush_width > 0 AND brush_width <= canvas_size / 2),
        image bytea NOT NULL CONSTRAINT drawings_image_check
            CHECK (octet_length(image) = {IMAGE_BYTES}),
        -- Every point [x, y], numbers within a canvas size of the canvas.
        CONSTRAINT drawings_points_check CHECK (
            {_none_in("strokes", '$[*][*] ? (@.type() != "array" || @.size() != 2)')}
            AND {_none_in("strokes", '$[*][*][*] ? (@.type() != "number"', vars=True)}
        )
    )
    """,
)

# Connection failures that mean the server is gone, not that one query failed: no SQLSTATE
# (a client-side failure), class 08 (connection exception), 57P01-57P03 (shutdown, crash,
# starting up).
_SERVER_GONE_STATES = ("57P01", "57P02", "57P03")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached: stopped, unreachable, or refusing the connection."""


class DatabaseBusy(DatabaseUnavailable):
    """The database is reachable but did not answer in time; nothing was stored: retry later."""


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


# --- the schema and the app's role ----------------------------------------------------------


def _create_schema(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
    for statement in _SCHEMA_SQL:
        conn.execute(statement)


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
            _create_schema(conn)
            if app_role is None or app_role == conn.info.user:
                return
            role = sql.Identifier(app_role)
            if not conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (app_role,)
            ).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
            if app_password:
                # Utility statements take no parameters: quoted client-side.
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, sql.Literal(app_password))
                )
            database = sql.Identifier(conn.info.dbname)
            for grant in (
                "GRANT CONNECT ON DATABASE {database} TO {role}",
                # Only the owner creates tables (PostgreSQL 15+ does this by default).
                "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
                "GRANT USAGE ON SCHEMA public TO {role}",
                "GRANT SELECT, INSERT ON predictions TO {role}",
                "GRANT USAGE ON SEQUENCE predictions_id_seq TO {role}",
                # The live model's version and weights (versions.py): read only.
                "GRANT SELECT ON model_versions, model_promotions TO {role}",
                # Drawings: written with each answer, never read back by the app.
                "GRANT INSERT ON drawings TO {role}",
            ):
                conn.execute(sql.SQL(grant).format(database=database, role=role))
    except psycopg.OperationalError as exc:
        raise _unavailable(exc) from exc
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
            _create_schema(conn)
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


# --- the pool, and what its connection attempts say about the server ------------------------


class _Health:
    """Whether the server is known to be down, from the latest connection attempt of the pool
    or of a probe; shared by every thread. While it is down, one probe at a time tries to
    connect; calls wait at most FAIL_FAST_S for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.down: str | None = None  # why, while the server is known down
        self.probe: threading.Thread | None = None
        self.probed = threading.Event()

    def connected(self) -> None:
        if self.down is not None:
            with self.lock:
                if self.down is not None:
                    logger.info("database reachable again")
                self.down = None

    def failed(self, exc: BaseException) -> None:
        reason = _reason(exc)
        with self.lock:
            if self.down is None:
                logger.warning("database unreachable: %s", reason)
            self.down = reason

    def ensure_up(self, conninfo: str, kwargs: dict[str, Any]) -> None:
        """Return at once if the server is not known down; else wait up to FAIL_FAST_S for a
        probe (started if none runs) and raise DatabaseUnavailable unless it connects."""
        if self.down is None:
            return
        with self.lock:
            if self.probe is None or not self.probe.is_alive():
                self.probed = threading.Event()
                self.probe = threading.Thread(
                    target=self._probe, args=(conninfo, kwargs, self.probed), daemon=True
                )
                self.probe.start()
            probed = self.probed
        probed.wait(FAIL_FAST_S)
        if (reason := self.down) is not None:
            raise DatabaseUnavailable(f"database unreachable: {reason}")

    def _probe(self, conninfo: str, kwargs: dict[str, Any], done: threading.Event) -> None:
        try:
            _TrackedConnection.connect(conninfo, **kwargs).close()
        except Exception:  # recorded by _TrackedConnection
            pass
        finally:
            done.set()


_health = _Health()


class _TrackedConnection(psycopg.Connection):
    """A connection that tells ``_health`` whether connecting worked (the pool's attempts
    happen in its background workers, where nobody else would see them fail)."""

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> _TrackedConnection:  # type: ignore[override]
        try:
            conn = super().connect(conninfo, **kwargs)
        except psycopg.OperationalError as exc:
            _health.failed(exc)
            raise
        _health.connected()
        return conn


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
    _health.connected()  # forget what the old pool saw


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
                connection_class=_TrackedConnection,
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


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _unavailable(exc: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"database unreachable: {_reason(exc)}")


def _server_gone(exc: psycopg.OperationalError, conn: psycopg.Connection) -> bool:
    state = exc.sqlstate
    return conn.broken or state is None or state.startswith("08") or state in _SERVER_GONE_STATES


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
            raise _unavailable(exc) from exc
        if (reason := _health.down) is not None:
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
    _health.ensure_up(pool.conninfo, _connect_kwargs())
    conn = _getconn(pool)
    try:
        with conn:  # commits, or rolls back on an error (as pool.connection() does)
            yield conn
    except (errors.QueryCanceled, errors.LockNotAvailable) as exc:
        raise DatabaseBusy(
            f"database busy: a query took longer than {STATEMENT_TIMEOUT_S} s ({_reason(exc)})"
        ) from exc
    except errors.TransactionRollback as exc:  # deadlock, serialization failure
        raise DatabaseBusy(f"database busy: {_reason(exc)}") from exc
    except psycopg.OperationalError as exc:
        if _server_gone(exc, conn):
            _health.failed(exc)
        raise _unavailable(exc) from exc
    finally:
        pool.putconn(conn)


# --- rows -----------------------------------------------------------------------------------


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


class DrawingTooLarge(ValueError):
    """A drawing over the documented size limits (MAX_STROKES, MAX_STROKE_POINTS, MAX_POINTS)."""


@dataclass(frozen=True)
class Drawing:
    """The drawing behind one answer, as the ``drawings`` table keeps it.

    - *strokes*: one list of ``[x, y]`` points per stroke, in drawing order, in canvas pixels
      (origin top left, y down): the pointer positions the canvas sampled, through which it
      drew its curves (``drawings.from_canvas``, ``drawings.render``).
    - *canvas_size*: the side of the square canvas, px; *brush_width*: the stroke width, px.
    - *image*: the 28x28 image the model read, uint8 row-major (0 background, 255 ink).

    Checked when made: DrawingTooLarge over the size limits, ValueError for anything else
    invalid, before the database is touched.
    """

    strokes: list[list[list[float]]]
    canvas_size: int
    brush_width: float
    image: bytes

    def __post_init__(self) -> None:
        size = self.canvas_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise ValueError(f"canvas_size must be an int, got {size!r}")
        if not MIN_CANVAS_SIZE <= size <= MAX_CANVAS_SIZE:
            raise ValueError(f"canvas_size must be {MIN_CANVAS_SIZE} to {MAX_CANVAS_SIZE} px")
        brush = self.brush_width
        if isinstance(brush, bool) or not isinstance(brush, numbers.Real):
            raise ValueError(f"brush_width must be a number, got {brush!r}")
        if not (math.isfinite(brush) and 0 < brush <= size / 2):
            raise ValueError(f"brush_width must be above 0 and at most {size / 2} px")
        if not isinstance(self.image, bytes) or len(self.image) != IMAGE_BYTES:
            raise ValueError(f"image must be {IMAGE_BYTES} bytes (28x28 uint8)")
        strokes = self.strokes
        if not isinstance(strokes, list) or not strokes:
            raise ValueError("strokes must be a non-empty list of strokes")
        # Sizes first: an oversized drawing is refused before its points are looked at.
        if len(strokes) > MAX_STROKES:
            raise DrawingTooLarge(f"{len(strokes)} strokes (at most {MAX_STROKES})")
        if not all(isinstance(stroke, list) and stroke for stroke in strokes):
            raise ValueError("each stroke must be a non-empty list of points")
        longest = max(len(stroke) for stroke in strokes)
        if longest > MAX_STROKE_POINTS:
            raise DrawingTooLarge(f"a stroke of {longest} points (at most {MAX_STROKE_POINTS})")
        total = sum(len(stroke) for stroke in strokes)
        if total > MAX_POINTS:
            raise DrawingTooLarge(f"{total} points (at most {MAX_POINTS})")
        low, high = -size, 2 * size
        for stroke in strokes:
            for point in stroke:
                if not (
                    isinstance(point, list)
                    and len(point) == 2
                    and all(
                        isinstance(v, numbers.Real)
                        and not isinstance(v, bool)
                        and low <= v <= high  # False for NaN
                        for v in point
                    )
                ):
                    raise ValueError(
                        f"each point must be [x, y], numbers from {low} to {high}: {point!r}"
                    )


def log_prediction(
    predicted_digit: int,
    true_label: int,
    confidence: float,
    submission_id: uuid.UUID | None = None,
    model: str | None = None,
    drawing: Drawing | None = None,
) -> int:
    """Store one answer and return its row id.

    *model* names the model that made the prediction (1 to 100 characters), or None.
    *drawing*, if given, is stored in ``drawings`` in the same transaction: both or neither.
    A *submission_id* already stored (a retried submission) stores nothing and returns the
    existing row's id. Invalid values raise ValueError before the database is touched.
    """
    if drawing is not None and not isinstance(drawing, Drawing):
        raise ValueError(f"drawing must be a db.Drawing or None, got {type(drawing).__name__}")
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
        elif drawing is not None:
            _insert_drawing(conn, row[0], drawing)
    assert row is not None
    elapsed_ms = (time.perf_counter() - start) * 1000
    if inserted:
        logger.info("inserted prediction id=%d in %.1f ms", row[0], elapsed_ms)
    else:
        logger.info("retried submission %s: already stored as id=%d", submission_id, row[0])
    return row[0]


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
    """A pooled connection in a transaction, for other modules' queries (versions.py);
    failures raise DatabaseUnavailable or DatabaseBusy."""
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


def export_drawings(conninfo: str, out: IO[str]) -> int:
    """Write every answer that has its drawing to *out* as JSON Lines, oldest first, and return
    how many. Each line: prediction_id, submission_id, created_at, predicted_digit, true_label,
    confidence, model, strokes, canvas_size, brush_width, image (base64 of the 784 bytes).
    Needs a role that may read ``drawings`` (the owner: the app's role may only insert)."""
    count = 0
    try:
        conn = psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        raise _unavailable(exc) from exc
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
