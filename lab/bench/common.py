"""What every benchmark section shares: result rows, percentiles, paths, a PostgreSQL server."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"

# The project's modules and the test helpers (conftest's PostgreSQL server, browser helpers).
for _path in (str(ROOT), str(TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@dataclass
class Row:
    """One line of the table. ``passed`` is None for rows without a target."""

    section: str
    metric: str
    value: float | None
    unit: str
    target: str = ""
    passed: bool | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def at_most(section: str, metric: str, value: float, unit: str, limit: float, **kw) -> Row:
    """A row whose target is ``value <= limit``."""
    return Row(section, metric, value, unit, f"<= {limit:g} {unit}", value <= limit, **kw)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Production-like durability: conftest's servers turn fsync off for speed; a benchmark of insert
# latency must not (the later settings in postgresql.conf win).
_DURABLE_CONF = """
# --- bench: durable like production ---
fsync = on
full_page_writes = on
synchronous_commit = on
"""


@contextlib.contextmanager
def postgres_server(durable: bool = True) -> Iterator[object]:
    """A running PostgreSQL (tests/conftest.py's PostgresProcess) in a temporary data directory
    on local disk, removed afterwards. Yields the server (``.url``, ``.stop()``, ``.start()``)."""
    from conftest import PostgresProcess

    base = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    base.chmod(0o711)  # as root, PostgreSQL runs as another user, who must traverse it
    server = None
    try:
        server = PostgresProcess(base / "pgdata")
        if durable:
            with (server.datadir / "postgresql.conf").open("a") as conf:
                conf.write(_DURABLE_CONF)
        server.start()
        yield server
    finally:
        if server is not None:
            server.destroy()
        shutil.rmtree(base, ignore_errors=True)


def mnist_dir() -> Path | None:
    """The full MNIST (MNIST_DIR, else data/mnist), or None if its files are not there."""
    import mnist

    directory = mnist.data_dir_from_env()
    if not directory.is_absolute():
        directory = ROOT / directory
    try:
        mnist.require_files(directory)
    except mnist.DatasetError:
        return None
    return directory


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    return env
