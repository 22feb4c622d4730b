"""Real PostgreSQL servers for the tests and benchmarks, from the binaries bundled in pgserver:
``PostgresProcess`` (a server of its own, on 127.0.0.1, that can be stopped, crashed, restarted),
``TcpProxy`` (a port in front of one that forwards, or hangs) and ``pg_command`` (initdb, pg_ctl,
pg_dump...). The superuser "postgres" needs no password; other roles must give theirs."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import stat
import subprocess
import threading
from pathlib import Path

import psycopg

import embedded_pg
from lab import free_port

# pgserver's binaries; as root, embedded_pg's copy of them that the server user may read (the clone,
# .venv included, may lie in a folder only root may enter).
PG_BIN = embedded_pg.bin_dir()

# PostgreSQL refuses to run as root: as root, run it as pgserver's own system user.
PG_OS_USER = embedded_pg.OS_USER if os.geteuid() == 0 else None

# Disposable servers: no fsync (PostgresProcess(durable=True) turns it back on).
_SERVER_CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
full_page_writes = off
"""
_DURABLE_CONF = "fsync = on\nfull_page_writes = on\nsynchronous_commit = on\n"
_PG_HBA = "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"


def _hand_over(path: Path) -> None:
    """Let PG_OS_USER own *path* (recursively). Its parents must let that user through: they
    are checked, never loosened (they may be someone's private folders)."""
    if PG_OS_USER is None:
        return
    try:
        entry = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", PG_OS_USER], check=True, capture_output=True)
        entry = pwd.getpwnam(PG_OS_USER)
    for parent in path.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise PermissionError(
                f"{parent} is closed to {PG_OS_USER}, who runs PostgreSQL as root: choose a"
                " folder it may traverse (a temporary folder of your own: chmod it 0o711)"
            )
    for dirpath, _, filenames in os.walk(path):
        for name in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
            os.chown(name, entry.pw_uid, entry.pw_gid)


def pg_command(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one of the bundled PostgreSQL programs (as PG_OS_USER when root)."""
    result = subprocess.run(
        [str(PG_BIN / args[0]), *args[1:]],
        user=PG_OS_USER,
        group=PG_OS_USER,
        extra_groups=[] if PG_OS_USER else None,
        cwd="/",  # PG_OS_USER may not be able to enter the current folder
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def initdb(datadir: Path) -> None:
    """Create a stopped data directory (a PostgresProcess's, or a template to copy)."""
    datadir.mkdir(parents=True)
    _hand_over(datadir)
    options = ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--wal-segsize=1"]
    pg_command("initdb", "-D", str(datadir), *options)
    with (datadir / "postgresql.conf").open("a") as conf:
        conf.write(_SERVER_CONF)
    (datadir / "pg_hba.conf").write_text(_PG_HBA)


class PostgresProcess:
    """A stoppable PostgreSQL server on 127.0.0.1:``port``, database and superuser "postgres".

    The data directory is made by initdb, or copied from *template* (a stopped data directory
    made by ``initdb``: much faster). *durable*: fsync on, as in production. The port is chosen
    once, so ``url`` survives ``stop()``/``start()``.
    """

    def __init__(self, datadir: Path, template: Path | None = None, durable: bool = False):
        self.datadir = datadir
        self.port = free_port()
        self._ever_started = False
        if template is None:
            initdb(datadir)
        else:
            shutil.copytree(template, datadir, symlinks=True)
            _hand_over(datadir)
        if durable:  # the later settings in postgresql.conf win
            with (datadir / "postgresql.conf").open("a") as conf:
                conf.write(_DURABLE_CONF)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return pg_command("pg_ctl", *args, "-D", str(self.datadir), check=check)

    def _running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def start(self) -> None:
        """Start the server and wait until it accepts connections (a no-op if running)."""
        if self._running():
            return
        log = self.datadir / "server.log"
        # Only the very first start may move to another port (if someone took the free one).
        for _ in range(1 if self._ever_started else 3):
            start = ["start", "-w", "-t", "30", "-l", str(log), "-o", f"-p {self.port}"]
            if (result := self._pg_ctl(*start, check=False)).returncode == 0:
                self._ever_started = True
                return
            if not self._ever_started:
                self.port = free_port()
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"PostgreSQL failed to start: {result.stderr}\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (a no-op if stopped). mode "immediate" simulates a crash."""
        if self._running():
            self._pg_ctl("stop", "-w", "-t", "30", "-m", mode)

    def connect(self, **kwargs) -> psycopg.Connection:
        """A new autocommit superuser connection (use it as a context manager)."""
        return psycopg.connect(self.url, autocommit=True, connect_timeout=3, **kwargs)

    def destroy(self) -> None:
        """Stop the server and delete its data directory."""
        self.stop(mode="immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)


class TcpProxy:
    """127.0.0.1:``port`` forwarding to 127.0.0.1:*target_port*, or, after ``hang()`` (or with
    no target), a server that accepts connections and never answers: the open ones are cut,
    new ones wait forever. ``forward()`` forwards again. ``url``: the superuser's URL."""

    def __init__(self, target_port: int | None = None):
        self.target_port = target_port
        self.hanging = target_port is None
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

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

    def hang(self, hanging: bool = True) -> None:
        self.hanging = hanging
        self._cut()

    def forward(self) -> None:
        self.hang(False)

    def close(self) -> None:
        self.listener.close()
        self._cut()
