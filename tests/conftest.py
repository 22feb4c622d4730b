"""Shared fixtures.

PostgreSQL: real servers run from the binaries bundled in the pgserver package, on 127.0.0.1
with a free port, trust auth for the superuser "postgres" (other roles need their password).

- ``pg_server`` (session): one server shared by the whole session. Never stop it.
- ``clean_db`` (function): ``pg_server`` with an empty ``predictions`` table, and the ``db``
  module pointed at it. Returns the server.
- ``fresh_pg_server`` (function): a server of the test's own, free to ``stop()`` and ``start()``;
  its ``url`` stays valid across restarts (give it to a subprocess as ``DATABASE_URL``).
  The ``db`` module is not pointed at it: call ``db.configure(server.url)``.
- ``pg_tmp_path`` (function): an empty directory to put a PostgreSQL data directory in.
- The ``db`` module's pool and configuration are reset after every test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import db

ROOT = Path(__file__).resolve().parent.parent

# Tests never need the full pen digits file: train.py runs started by any test read the
# committed subset unless PENDIGITS_DIR says otherwise (as MNIST tests pass the MNIST subset).
os.environ.setdefault("PENDIGITS_DIR", str(ROOT / "tests" / "data" / "pendigits-subset"))

_pgserver_spec = importlib.util.find_spec("pgserver")
assert _pgserver_spec is not None and _pgserver_spec.submodule_search_locations
PG_BIN = Path(_pgserver_spec.submodule_search_locations[0]) / "pginstall" / "bin"

# PostgreSQL refuses to run as root: as root, run it as pgserver's own system user.
PG_OS_USER = "pgserver" if os.geteuid() == 0 else None

_INITDB_OPTIONS = ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--wal-segsize=1"]

_SERVER_CONF = """
# --- tests (conftest.py) ---
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
full_page_writes = off
"""

# The superuser "postgres" needs no password; every other role must give its password.
_PG_HBA = """\
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_os_user() -> None:
    if PG_OS_USER is None:
        return
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", PG_OS_USER], check=True, capture_output=True)


def _hand_over(path: Path) -> None:
    """Let PG_OS_USER own *path* (recursively) and traverse its parents."""
    if PG_OS_USER is None:
        return
    entry = pwd.getpwnam(PG_OS_USER)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)


def pg_command(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one of the bundled PostgreSQL programs (as PG_OS_USER when root)."""
    result = subprocess.run(
        [str(PG_BIN / args[0]), *args[1:]],
        user=PG_OS_USER,
        group=PG_OS_USER,
        extra_groups=[] if PG_OS_USER else None,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def initdb(datadir: Path) -> None:
    """Create a data directory for a PostgresProcess."""
    _ensure_os_user()
    datadir.mkdir(parents=True)
    _hand_over(datadir)
    pg_command("initdb", "-D", str(datadir), *_INITDB_OPTIONS)
    with (datadir / "postgresql.conf").open("a") as conf:
        conf.write(_SERVER_CONF)
    (datadir / "pg_hba.conf").write_text(_PG_HBA)


class PostgresProcess:
    """A stoppable PostgreSQL server on 127.0.0.1:``port``, database and superuser "postgres".

    The data directory is made by initdb, or copied from *template* (a stopped data directory
    made by ``initdb``), which is much faster. The port is chosen once, so ``url`` survives
    ``stop()``/``start()``.
    """

    def __init__(self, datadir: Path, template: Path | None = None):
        self.datadir = datadir
        self.port = _free_port()
        self._ever_started = False
        if template is None:
            initdb(datadir)
        else:
            shutil.copytree(template, datadir, symlinks=True)
            _hand_over(datadir)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log_file(self) -> Path:
        return self.datadir / "server.log"

    @property
    def is_running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return pg_command("pg_ctl", *args, "-D", str(self.datadir), check=check)

    def start(self) -> None:
        """Start the server and wait until it accepts connections (a no-op if running)."""
        if self.is_running:
            return
        # Only the very first start may move to another port (if someone took the free one).
        for _ in range(1 if self._ever_started else 3):
            log, port = str(self.log_file), f"-p {self.port}"
            result = self._pg_ctl("start", "-w", "-t", "30", "-l", log, "-o", port, check=False)
            if result.returncode == 0:
                self._ever_started = True
                return
            if not self._ever_started:
                self.port = _free_port()
        tail = self.log_file.read_text()[-3000:] if self.log_file.exists() else ""
        raise RuntimeError(f"PostgreSQL failed to start: {result.stderr}\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (a no-op if stopped). mode "immediate" simulates a crash."""
        if self.is_running:
            self._pg_ctl("stop", "-w", "-t", "30", "-m", mode)

    def connect(self, **kwargs) -> psycopg.Connection:
        """A new autocommit superuser connection (use it as a context manager)."""
        return psycopg.connect(self.url, autocommit=True, connect_timeout=3, **kwargs)

    def destroy(self) -> None:
        """Stop the server and delete its data directory."""
        self.stop(mode="immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"PostgresProcess({self.url}, datadir={self.datadir})"


class TcpProxy:
    """127.0.0.1:``port`` forwarding to 127.0.0.1:*target_port*, or, after ``hang()`` (or with
    no target), a server that accepts connections and never answers: the open ones are cut,
    new ones wait forever. ``forward()`` forwards again. ``url``: the superuser's URL."""

    def __init__(self, target_port: int | None = None):
        self.target_port = target_port
        self.hanging = target_port is None
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _accept(self) -> None:
        while True:
            try:
                client = self.listener.accept()[0]
            except OSError:
                return  # closed
            self.sockets.append(client)
            if self.hanging:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def _cut(self) -> None:
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def hang(self) -> None:
        self.hanging = True
        self._cut()

    def forward(self) -> None:
        self.hanging = False
        self._cut()

    def close(self) -> None:
        self.listener.close()
        self._cut()


def _fast_tmp_dir() -> str | None:
    """/dev/shm (tmpfs) if it has room: data directories are I/O heavy and disposable."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2**30:
        return str(shm)
    return None  # the default temporary directory


@pytest.fixture(scope="session")
def _pg_base_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root, PostgreSQL runs as PG_OS_USER, who must traverse the
    # path, and each pytest session that starts (anyone's) resets /tmp/pytest-of-root to 0700.
    base = Path(tempfile.mkdtemp(prefix="pytest-postgres-", dir=_fast_tmp_dir()))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_tmp_path(_pg_base_dir: Path, request: pytest.FixtureRequest) -> Path:
    """A new empty directory for a PostgreSQL data directory (the test's own; removed at the end
    of the session). Use it instead of tmp_path for pgdata: see _pg_base_dir."""
    path = Path(tempfile.mkdtemp(prefix=f"{request.node.name[:40]}-", dir=_pg_base_dir))
    path.chmod(0o711)
    return path


@pytest.fixture(scope="session")
def pg_template(_pg_base_dir: Path) -> Path:
    """A stopped, freshly initialised data directory to copy servers from."""
    datadir = _pg_base_dir / "template"
    initdb(datadir)
    return datadir


@pytest.fixture(scope="session")
def pg_server(pg_template: Path, _pg_base_dir: Path) -> Iterator[PostgresProcess]:
    """The session's shared server. Do not stop it: use fresh_pg_server for that."""
    server = PostgresProcess(_pg_base_dir / "shared", template=pg_template)
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def fresh_pg_server(pg_template: Path, pg_tmp_path: Path) -> Iterator[PostgresProcess]:
    """A running server of this test's own, which the test may stop and start."""
    server = PostgresProcess(pg_tmp_path / "pgdata", template=pg_template)
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def clean_db(pg_server: PostgresProcess) -> PostgresProcess:
    """The shared server with an empty ``predictions`` table; ``db`` is pointed at it."""
    pg_server.start()  # in case a test stopped it by mistake
    with pg_server.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS predictions")
    db.configure(pg_server.url)
    db.init_db()
    return pg_server


@pytest.fixture(autouse=True)
def _reset_db_module() -> Iterator[None]:
    yield
    db.configure(None)
