"""What every benchmark section shares: result rows, percentiles, paths, a PostgreSQL server."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.postgres import PostgresProcess

ROOT = Path(__file__).resolve().parents[2]


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


@contextlib.contextmanager
def postgres_server(durable: bool = True) -> Iterator[PostgresProcess]:
    """A running PostgreSQL (lab.postgres) in a temporary data directory on local disk, fsync on
    unless not *durable*, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    base.chmod(0o711)  # as root, PostgreSQL runs as another user, who must traverse it
    server = None
    try:
        server = PostgresProcess(base / "pgdata", durable=durable)
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
