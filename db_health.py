"""Whether the database server is up, as connection attempts tell (``health``, shared by every
thread), and the errors db.py raises when it is not (``DatabaseUnavailable``, ``DatabaseBusy``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg

logger = logging.getLogger("db")

FAIL_FAST_S = 0.5  # while the server is known down, how long a call waits for a new attempt

# Connection failures that mean the server is gone, not that one query failed: no SQLSTATE
# (a client-side failure), class 08 (connection exception), 57P01-57P03 (shutdown, crash,
# starting up).
_SERVER_GONE_STATES = ("57P01", "57P02", "57P03")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached: stopped, unreachable, or refusing the connection."""


class DatabaseBusy(DatabaseUnavailable):
    """The database is reachable but did not answer in time; nothing was stored: retry later."""


def reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def unavailable(exc: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"database unreachable: {reason(exc)}")


def server_gone(exc: psycopg.OperationalError, conn: psycopg.Connection) -> bool:
    state = exc.sqlstate
    return conn.broken or state is None or state.startswith("08") or state in _SERVER_GONE_STATES


class Health:
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
        why = reason(exc)
        with self.lock:
            if self.down is None:
                logger.warning("database unreachable: %s", why)
            self.down = why

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
        if (why := self.down) is not None:
            raise DatabaseUnavailable(f"database unreachable: {why}")

    def _probe(self, conninfo: str, kwargs: dict[str, Any], done: threading.Event) -> None:
        try:
            TrackedConnection.connect(conninfo, **kwargs).close()
        except Exception:  # recorded by TrackedConnection
            pass
        finally:
            done.set()


health = Health()


class TrackedConnection(psycopg.Connection):
    """A connection that tells ``health`` whether connecting worked (the pool's attempts
    happen in its background workers, where nobody else would see them fail)."""

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> TrackedConnection:  # type: ignore[override]
        try:
            conn = super().connect(conninfo, **kwargs)
        except psycopg.OperationalError as exc:
            health.failed(exc)
            raise
        health.connected()
        return conn
