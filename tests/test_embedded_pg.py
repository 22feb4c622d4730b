"""embedded_pg.py: the embedded PostgreSQL of `make run`, started through db.resolve_conninfo as
the app does; as root, a private clone stays private."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import ROOT

import db
import embedded_pg
from lab.postgres import pg_command


@pytest.fixture
def embedded_pgdata(pg_base_dir):
    directory = Path(tempfile.mkdtemp(prefix="embedded-", dir=pg_base_dir))
    directory.chmod(0o711)
    pgdata = directory / "data" / "postgres"  # no parent yet, like data/ in a fresh clone
    yield pgdata
    if (pgdata / "postmaster.pid").exists():
        pg_command("pg_ctl", "stop", "-m", "immediate", "-D", str(pgdata), check=False)


def postmasters(pgdata: Path) -> list[int]:
    """PIDs of PostgreSQL postmasters (not their children) serving *pgdata*."""
    return [
        proc.pid
        for proc in psutil.process_iter(["name", "cmdline"])
        if proc.info["name"] == "postgres"
        and str(pgdata) in (proc.info["cmdline"] or [])
        and psutil.Process(proc.ppid()).name() != "postgres"
    ]


def app_process(pgdata: Path, inserts: int) -> subprocess.Popen[str]:
    """A new Python process that resolves the database as the app does, inserts, and prints the
    row count it sees."""
    code = (
        "import json, sys, db\n"
        f"db.configure(db.resolve_conninfo({{}}, pgdata={str(pgdata)!r}))\n"
        f"for i in range({inserts}): db.log_prediction(i % 10, i % 10, 0.5)\n"
        "print(json.dumps({'count': db.count_predictions()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "POSTGRES_HOST")}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )


@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR is not set")
def test_the_embedded_default_is_one_server_that_keeps_its_data(embedded_pgdata, caplog):
    # Two app processes start at once in a fresh clone: one server for both, left running.
    processes = [app_process(embedded_pgdata, inserts=25) for _ in range(2)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert all(json.loads(output)["count"] >= 25 for output in outputs)
    [pid] = postmasters(embedded_pgdata)

    caplog.set_level(logging.INFO, logger="db")
    db.configure(db.resolve_conninfo({}, pgdata=embedded_pgdata))  # reuses it
    assert str(embedded_pgdata) in caplog.text  # the log says where the data lives
    assert db.count_predictions() == 50
    assert postmasters(embedded_pgdata) == [pid]
    db.close_pool()

    # Stopped (`python db.py stop-embedded`, as `make run` does on Ctrl-C): started again.
    assert embedded_pg.stop(embedded_pgdata)
    assert postmasters(embedded_pgdata) == []
    db.configure(db.resolve_conninfo({}, pgdata=embedded_pgdata))
    assert db.count_predictions() == 50
    assert len(postmasters(embedded_pgdata)) == 1


def clone_process(clone: Path, code: str, path: Path | None = None) -> str:
    """Run *code* in a new Python process in *clone* (a copy of db.py and those it imports) as
    `make run` would, pgserver imported from *path* if given; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "POSTGRES_HOST")}
    if path is not None:
        env["PYTHONPATH"] = str(path)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# What a clone needs to run db.py: it and the modules below it.
CLONED = ("db.py", "db_health.py", "embedded_pg.py", "schema.py", "settings.py")
STORE_ONE = (
    "import db, embedded_pg\n"
    "db.configure(db.resolve_conninfo())\n"
    "db.log_prediction(3, 5, 0.75)\n"
    "print(embedded_pg.data_dir(), db.count_predictions())\n"
)
STOP = "import db, sys; sys.exit(db.main(['db.py', 'stop-embedded']))"


def modes(folder: Path) -> dict[Path, int]:
    """The permissions of *folder*, every folder in it and every folder above it."""
    found = {parent: parent.stat().st_mode for parent in folder.parents}
    for dirpath, _, _ in os.walk(folder):
        found[Path(dirpath)] = Path(dirpath).stat().st_mode
    return found


def test_the_embedded_server_leaves_a_private_clone_private(tmp_path: Path):
    # A clone, and the venv holding pgserver's PostgreSQL, in a folder only its owner may enter
    # (as /root on Ubuntu). As root, PostgreSQL runs as another user.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    clone, site = private / "clone", private / "clone" / ".venv-site"
    clone.mkdir()
    for name in CLONED:
        shutil.copy2(ROOT / name, clone)
    package = Path(importlib.util.find_spec("pgserver").submodule_search_locations[0])
    ignore = shutil.ignore_patterns("include", "__pycache__")
    shutil.copytree(package, site / "pgserver", symlinks=True, ignore=ignore)
    if (package.parent / "pgserver.libs").is_dir():
        shutil.copytree(package.parent / "pgserver.libs", site / "pgserver.libs")
    before = modes(private)
    assert clone_process(clone, "import pgserver; print(pgserver.__file__)", site).startswith(
        str(site)
    )

    pgdata, count = clone_process(clone, STORE_ONE, site).split()
    pgdata = Path(pgdata)
    try:
        assert count == "1"
        assert clone_process(clone, STOP, site).startswith("stopped the embedded PostgreSQL")
        assert postmasters(pgdata) == []
        if os.geteuid() == 0:
            assert pgdata.parent.parent == embedded_pg.ROOT_DIR
            assert not (clone / "data").exists()
        else:
            assert pgdata == clone / "data" / "postgres"
        assert {path: modes(private).get(path) for path in before} == before
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    finally:
        if pgdata.parent.parent == embedded_pg.ROOT_DIR:
            if postmasters(pgdata):
                embedded_pg.stop(pgdata)
            shutil.rmtree(pgdata.parent)


def test_as_root_the_data_of_data_postgres_moves_to_the_server_users_folder(pg_base_dir):
    # Before issue 23, the embedded data lived in data/postgres as root too (its parents made
    # world-readable), its server often still running: the next start stops and moves it.
    clone = Path(tempfile.mkdtemp(prefix="clone-", dir=pg_base_dir))
    clone.chmod(0o755)
    for name in CLONED:
        shutil.copy2(ROOT / name, clone)
    old = clone / "data" / "postgres"
    old_store = STORE_ONE.replace("resolve_conninfo()", f"resolve_conninfo(pgdata={str(old)!r})")
    assert clone_process(clone, old_store).split()[1] == "1"
    assert len(postmasters(old)) == 1

    pgdata = old
    try:
        pgdata, count = clone_process(clone, STORE_ONE).split()
        pgdata = Path(pgdata)
        assert count == "2"  # the old row, and the new one
        if os.geteuid() == 0:
            assert pgdata != old
            assert not old.exists() and postmasters(old) == []
            assert len(postmasters(pgdata)) == 1
    finally:
        for folder in {old, pgdata}:
            if postmasters(folder):
                embedded_pg.stop(folder)
        if pgdata.parent.parent == embedded_pg.ROOT_DIR:
            shutil.rmtree(pgdata.parent)
