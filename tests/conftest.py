"""Shared fixtures. PostgreSQL servers are lab.postgres's (real, on 127.0.0.1, superuser
"postgres" without a password):

- ``pg_server`` (session): one server shared by the whole session. Never stop it.
- ``clean_db``: ``pg_server`` with empty ``predictions`` and ``drawings`` tables, ``db`` pointed
  at it.
- ``fresh_pg_server``: a server of the test's own, free to ``stop()`` and ``start()``; its
  ``url`` survives restarts. ``db`` is not pointed at it: call ``db.configure(server.url)``.
- ``pg_template`` (session): a stopped data directory to copy a ``PostgresProcess`` from.
- ``chromium`` (session): one headless Chromium (fails, never skips, if it is missing).
- The ``db`` module's pool and configuration are reset after every test.
- The registry's tests' fixtures are tests/registry_fixtures.py's (``pytest_plugins``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import db
from lab import browser
from lab.postgres import PostgresProcess, initdb

ROOT = Path(__file__).resolve().parent.parent

pytest_plugins = ["registry_fixtures"]

# Tests never need the full pen digits file: train.py runs started by any test read the
# committed subset unless PENDIGITS_DIR says otherwise (as MNIST tests pass the MNIST subset).
os.environ.setdefault("PENDIGITS_DIR", str(ROOT / "tests" / "data" / "pendigits-subset"))


@pytest.fixture(scope="session")
def pg_base_dir() -> Iterator[Path]:
    """Where the data directories go: /dev/shm (tmpfs) if it has room, they are I/O heavy and
    disposable. Not under pytest's tmp_path: as root, PostgreSQL runs as another user, who must
    traverse the path, and each pytest session (anyone's) resets /tmp/pytest-of-root to 0700."""
    shm = Path("/dev/shm")
    fast = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2**30
    base = Path(tempfile.mkdtemp(prefix="pytest-postgres-", dir=shm if fast else None))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_base_dir: Path) -> Path:
    datadir = pg_base_dir / "template"
    initdb(datadir)
    return datadir


@contextlib.contextmanager
def own_server(pg_base_dir: Path, pg_template: Path) -> Iterator[PostgresProcess]:
    """A started server of its own (copied from the template), destroyed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="pg-", dir=pg_base_dir))
    directory.chmod(0o711)  # ours: as root, PostgreSQL's user must traverse it (lab.postgres)
    server = PostgresProcess(directory / "pgdata", template=pg_template)
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pg_server(pg_template: Path, pg_base_dir: Path) -> Iterator[PostgresProcess]:
    with own_server(pg_base_dir, pg_template) as server:
        yield server


@pytest.fixture
def fresh_pg_server(pg_template: Path, pg_base_dir: Path) -> Iterator[PostgresProcess]:
    with own_server(pg_base_dir, pg_template) as server:
        yield server


@pytest.fixture
def clean_db(pg_server: PostgresProcess) -> PostgresProcess:
    pg_server.start()  # in case a test stopped it by mistake
    with pg_server.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS drawings, predictions, learning_attempts")
    db.configure(pg_server.url)
    db.init_db()
    return pg_server


@pytest.fixture(autouse=True)
def _reset_db_module() -> Iterator[None]:
    yield
    db.configure(None)


@pytest.fixture(scope="session")
def chromium() -> Iterator[browser.Browser]:
    with browser.chromium() as instance:
        yield instance


def aligned_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two 28x28 images (of 255), once aligned by at most one pixel:
    centring rounds a digit's centre of mass to a whole pixel, so the canvas's anti-aliasing,
    which a re-rendering of its strokes cannot copy exactly, may move the whole image by one."""
    a, b = a.astype(np.int16), b.astype(np.int16)
    return min(
        float(np.abs(np.roll(a, (dy, dx), (0, 1)) - b).mean())
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Whether *condition()* came true within *timeout* seconds (asked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
