"""The embedded PostgreSQL of `make run` (and of the tests): pgserver's server, used when neither
DATABASE_URL nor POSTGRES_HOST is set (see db.resolve_conninfo).

Not root: pgserver as it is, its data in ``data/postgres`` in the project. As root, PostgreSQL runs
as the system user ``OS_USER``, who may not read the clone (often in a 0700 home), and pgserver
would loosen every folder above its binaries and data (``chmod o+rx`` up to ``/``). So as root its
binaries (a copy of pgserver's) and its data live in ``ROOT_DIR``, in folders made for that user,
and the user's folders are never chmod-ed.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger("db")

PROJECT_ROOT = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = PROJECT_ROOT / "data" / "postgres"  # the data, unless run as root
ROOT_DIR = Path("/var/lib/mnist-digit-classifier")  # binaries and data, as root
OS_USER = "pgserver"  # pgserver's own choice, so data made by earlier versions still works


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def data_dir() -> Path:
    """Where the embedded PostgreSQL keeps its data: ``data/postgres`` in the project, or, as
    root, ``ROOT_DIR/<clone folder name>-<hash of its path>/postgres`` (one per clone)."""
    if not _as_root():
        return DEFAULT_DATA_DIR
    key = hashlib.sha256(str(PROJECT_ROOT).encode()).hexdigest()[:12]
    return ROOT_DIR / f"{PROJECT_ROOT.name}-{key}" / "postgres"


def _root_owned_dir(path: Path) -> Path:
    """Create *path* as a folder of root's that every user may traverse, not write; or check
    that it is one writable by root alone (an existing folder's permissions are left alone)."""
    if not path.parent.exists():
        _root_owned_dir(path.parent)
    try:
        path.mkdir(mode=0o755)
        path.chmod(0o755)  # ours, just made: a umask may have narrowed it
    except FileExistsError:
        info = path.stat()
        if info.st_uid != 0 or info.st_mode & 0o022:
            raise PermissionError(f"{path} must be owned by root, writable by root alone") from None
    return path


def bin_dir() -> Path:
    """The PostgreSQL programs that the embedded server (and lab/postgres.py) run: pgserver's,
    or, as root, a copy in ``ROOT_DIR`` readable by ``OS_USER`` (made once per
    pgserver version), since the clone and its .venv may be in a folder only root may enter."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("pgserver")  # imported, pgserver runs nothing yet
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pgserver is not installed (it is in requirements-local.txt)")
    package = Path(spec.submodule_search_locations[0])
    if not _as_root():
        return package / "pginstall" / "bin"
    version = importlib.metadata.version("pgserver")
    target = _root_owned_dir(ROOT_DIR) / f"pgserver-{version}"
    # The same layout as in site-packages: the programs find their libraries relative to
    # themselves ($ORIGIN/../../../pgserver.libs). Not include/: headers are for building.
    parts = ["pgserver/pginstall/bin", "pgserver/pginstall/lib", "pgserver/pginstall/share"]
    if (package.parent / "pgserver.libs").is_dir():
        parts.append("pgserver.libs")
    bin_dir = target / parts[0]
    if not (bin_dir / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix=".pgserver-", dir=ROOT_DIR))
        try:
            for part in parts:
                shutil.copytree(package.parent / part, staging / part, symlinks=True)
            for folder, _, files in os.walk(staging):
                os.chmod(folder, 0o755)
                for name in files:
                    mode = os.lstat(file := os.path.join(folder, name)).st_mode
                    if stat.S_ISREG(mode):  # executables stay executable, by everyone
                        os.chmod(file, 0o755 if mode & stat.S_IXUSR else 0o644)
            try:
                staging.rename(target)  # whole, or not at all (another process may win)
            except OSError:
                if not (bin_dir / "postgres").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return bin_dir


def _os_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        command = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        subprocess.run([*command, OS_USER], check=True, capture_output=True)
        return pwd.getpwnam(OS_USER)


def _pg(program: str, *args: str, user: pwd.struct_passwd | None = None) -> None:
    """Run one of the PostgreSQL programs of bin_dir() (as *user*, if given)."""
    result = subprocess.run(
        [str(bin_dir() / program), *args],
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
        extra_groups=[] if user else None,
        cwd="/",  # the server user may not be able to enter the current folder
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{program} failed ({result.returncode}): {result.stderr.strip()}")


def _start_as_root(pgdata: Path) -> str:
    """Start (if need be) the embedded server of *pgdata* as OS_USER, from binaries and
    in folders that user may read, changing no permission outside them; return its URI."""
    user = _os_user()
    home = _root_owned_dir(pgdata.parent)
    for folder in pgdata.parents:
        if not folder.stat().st_mode & stat.S_IXOTH:
            raise PermissionError(
                f"{folder} is closed to the {user.pw_name} user, who runs PostgreSQL (and this"
                " project never loosens a folder's permissions): choose a data folder elsewhere"
            )
    with open(home / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one initdb and one start, however many processes
        if pgdata == data_dir() and not pgdata.exists():
            _adopt_old_data(pgdata, user)
        (home / "clone").write_text(f"{PROJECT_ROOT}\n")  # whose data this is, for a person
        pgdata.mkdir(mode=0o700, exist_ok=True)
        os.chown(pgdata, user.pw_uid, user.pw_gid)
        if not (pgdata / "PG_VERSION").exists():
            options = ["--auth=trust", "--encoding=utf8", "-U", "postgres"]
            _pg("initdb", "-D", str(pgdata), *options, user=user)
        if not _running(pgdata):
            log = str(pgdata / "log")
            options = f"-h '' -k {pgdata}"  # no TCP: a socket in the data folder, for root
            _pg("pg_ctl", "-D", str(pgdata), "-w", "-l", log, "-o", options, "start", user=user)
    return f"postgresql://postgres:@/postgres?host={pgdata}"


def _adopt_old_data(pgdata: Path, user: pwd.struct_passwd) -> None:
    """Move the data that versions before issue 23 kept in data/postgres as root (after making
    every folder above it world-readable) to *pgdata*, stopping its server first."""
    old = DEFAULT_DATA_DIR
    if not (old / "PG_VERSION").exists():
        return
    if _running(old):
        _pg("pg_ctl", "-D", str(old), "-w", "-m", "fast", "stop", user=user)
    logger.warning("moving the embedded PostgreSQL data from %s to %s (issue 23)", old, pgdata)
    staging = pgdata.with_name(".postgres-moving")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(old, staging, symlinks=True)  # another file system, perhaps: copy, then
    for folder, _, files in os.walk(staging):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            os.lchown(name, user.pw_uid, user.pw_gid)
    (staging / "postmaster.pid").unlink(missing_ok=True)
    staging.rename(pgdata)  # switch over, then remove the old copy
    shutil.rmtree(old)


def _running(pgdata: Path) -> bool:
    """Whether a postmaster serves *pgdata* (its postmaster.pid names a live process)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def start(pgdata: Path | None = None) -> str:
    """Start the embedded server of *pgdata* (default: data_dir()) unless it runs already, and
    leave it running for the next process; return its superuser's URI."""
    pgdata = data_dir() if pgdata is None else pgdata
    if _as_root():
        return _start_as_root(pgdata)
    import pgserver  # only needed without configuration

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


def stop(pgdata: Path | None = None) -> bool:
    """Stop the embedded PostgreSQL serving *pgdata* (default: data_dir()), if it runs;
    True if it was stopped."""
    pgdata = data_dir() if pgdata is None else pgdata
    if not (pgdata / "postmaster.pid").exists():
        return False
    # PostgreSQL refuses to run as root: it runs as the data directory's owner.
    user = pwd.getpwuid(pgdata.stat().st_uid) if _as_root() else None
    _pg("pg_ctl", "-D", str(pgdata), "-w", "-m", "fast", "stop", user=user)
    return True
