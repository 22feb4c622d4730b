"""deploy/*.sh, the deploy workflow and the Dockerfile: linter-clean, and what they do, without
root or network. Each script is executed as a person runs it (``deploy/x.sh``: its shebang and
executable bit are part of what is tested).

setup-server.sh runs in DRY_RUN mode against a temporary copy of the checkout; the backup and
restore scripts run against a stub `docker` that executes the `docker compose exec db ...`
command locally, with the real pg_dump/psql, against a real PostgreSQL server.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg.types.json import Jsonb

import db

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "deploy").glob("*.sh"))
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
VENV_BIN = Path(sys.executable).parent
# A PATH without /usr/local/bin (where this machine's docker client lives) and without sbin
# (ufw): the scripts see a machine without Docker, as on a fresh server. Stubs go first.
BASE_PATH = "/usr/bin:/bin"


def stub(tmp_path: Path, name: str, body: str) -> None:
    """An executable *name* running *body*, in tmp_path/bin (first on the script's PATH)."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / name).write_text(body)
    (tmp_path / "bin" / name).chmod(0o755)


def find_tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    assert path, f"{name} not found: pip install -r requirements-dev.txt"
    return path


LINTERS = [
    *(["shellcheck", "--severity=style", "--external-sources", str(path)] for path in SCRIPTS),
    # actionlint also runs shellcheck on every `run:` script of the workflows.
    ["actionlint", "-color=false", *map(str, WORKFLOWS)],
    ["hadolint", "--no-color", "--failure-threshold", "style", "Dockerfile"],
]


@pytest.mark.parametrize("command", LINTERS, ids=lambda c: f"{c[0]} {Path(c[-1]).name}")
def test_the_deploy_files_pass_their_linters(command: list[str]) -> None:
    result = subprocess.run(
        [find_tool(command[0]), *command[1:]],
        cwd=ROOT,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the files the scripts work on, in tmp_path/repo."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "deploy", repo / "deploy")
    for name in (".env.example", "docker-compose.yml", "docker-compose.https.yml"):
        shutil.copy2(ROOT / name, repo / name)
    return repo


def run_script(repo: Path, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """deploy/<name> executed (its shebang, its executable bit) from outside the checkout."""
    return subprocess.run(
        [str(repo / "deploy" / name), *args],
        cwd=repo.parent,  # the script must find its checkout by itself
        env={"PATH": f"{repo.parent / 'bin'}:{BASE_PATH}", "HOME": str(repo.parent), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_setup(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script(repo, "setup-server.sh", *args, DRY_RUN="1")


def env_values(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if re.match(r"\w+=", line))


def printed_commands(output: str) -> list[str]:
    return [line[2:] for line in output.splitlines() if line.startswith("+ ")]


# --- setup-server.sh -----------------------------------------------------------------------------

PASSWORDS = ("POSTGRES_PASSWORD", "APP_DB_PASSWORD")


def test_dry_run_creates_env_with_strong_random_passwords(repo: Path) -> None:
    result = run_setup(repo)
    assert result.returncode == 0, result.stderr
    values, example = env_values(repo / ".env"), env_values(repo / ".env.example")
    passwords = {values.pop(name) for name in PASSWORDS}
    assert len(passwords) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", p) for p in passwords)
    assert values == {k: v for k, v in example.items() if k not in PASSWORDS}  # copied as is
    assert stat.S_IMODE((repo / ".env").stat().st_mode) == 0o600


def test_an_existing_env_gets_its_missing_passwords_once_and_keeps_the_rest(repo: Path) -> None:
    env_file = repo / ".env"
    env_file.write_text("# mine\nPOSTGRES_PASSWORD=\nAPP_PORT=8080\n")  # from before APP_DB_...
    assert run_setup(repo).returncode == 0
    filled = env_file.read_text()
    password = "[0-9a-f]{64}"
    expected = rf"# mine\nPOSTGRES_PASSWORD={password}\nAPP_PORT=8080\nAPP_DB_PASSWORD={password}\n"
    assert re.fullmatch(expected, filled), filled
    result = run_setup(repo)
    assert env_file.read_text() == filled and "left unchanged" in result.stdout
    assert "ufw allow 8080/tcp" in printed_commands(result.stdout)


def test_dry_run_prints_the_server_steps_and_runs_none(repo: Path, tmp_path: Path) -> None:
    # Stubs that record any call: a dry run must not call them. Docker is a stub that fails as
    # on a fresh server, whether or not this machine has Docker.
    calls = tmp_path / "calls.log"
    for name in ("sudo", "apt-get", "ufw", "curl", "systemctl", "chown", "install"):
        stub(tmp_path, name, f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n')
    stub(tmp_path, "docker", "#!/bin/sh\necho 'docker: not installed' >&2\nexit 127\n")
    result = run_setup(repo)
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), calls.read_text()
    commands = printed_commands(result.stdout)
    prefix = "" if os.geteuid() == 0 else "sudo "
    expected_in_order = [
        f"{prefix}apt-get install -y docker-ce docker-ce-cli containerd.io "
        "docker-buildx-plugin docker-compose-plugin",
        f"{prefix}chown -R 1000:1000 data models",
        f"{prefix}ufw allow 22/tcp",
        f"{prefix}ufw allow 8501/tcp",
        f"{prefix}ufw --force enable",
        f"{prefix}docker compose -f docker-compose.yml up -d --build --wait",
    ]
    positions = [commands.index(c) for c in expected_in_order]
    assert positions == sorted(positions), commands
    assert (repo / "data").is_dir() and (repo / "models" / "checkpoints").is_dir()


def test_existing_docker_is_not_reinstalled(repo: Path, tmp_path: Path) -> None:
    compose = '[ "$1 $2 $3" = "compose version --short" ] && echo 2.29.1 && exit 0'
    stub(tmp_path, "docker", f"#!/bin/sh\n{compose}\nexit 99\n")
    result = run_setup(repo)
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stdout
    assert not any("apt-get" in c for c in printed_commands(result.stdout))
    # too old a Compose (no `required: false` for env_file) triggers the install
    stub(tmp_path, "docker", "#!/bin/sh\necho 2.20.2\n")
    result = run_setup(repo)
    assert any("docker-compose-plugin" in c for c in printed_commands(result.stdout))


def test_https_needs_a_domain_then_opens_80_443_only(repo: Path) -> None:
    result = run_setup(repo, "--https")
    assert result.returncode != 0 and "DOMAIN" in result.stderr
    env_file = repo / ".env"
    env_file.write_text(env_file.read_text().replace("\nDOMAIN=\n", "\nDOMAIN=digits.example\n"))
    result = run_setup(repo, "--https")
    assert result.returncode == 0, result.stderr
    commands = " | ".join(printed_commands(result.stdout))
    assert all(f"ufw allow {rule}" in commands for rule in ("80/tcp", "443/tcp", "443/udp"))
    assert "8501" not in commands and "-f docker-compose.https.yml up -d" in commands


def test_private_app_port_is_not_opened(repo: Path) -> None:
    (repo / ".env").write_text("POSTGRES_PASSWORD=x\nAPP_BIND=127.0.0.1\n")
    result = run_setup(repo, "--no-start")
    assert result.returncode == 0, result.stderr
    commands = " | ".join(printed_commands(result.stdout))
    assert "8501" not in commands and "docker compose" not in commands


def test_unknown_option_is_an_error(repo: Path) -> None:
    result = run_setup(repo, "--frobnicate")
    assert result.returncode == 2 and "Usage" in result.stderr
    assert not (repo / ".env").exists()


# --- backup-db.sh / restore-db.sh ----------------------------------------------------------------

DOCKER_STUB = """#!/usr/bin/env bash
# Stands in for `docker compose exec -T db sh -c CMD`: runs CMD here, against the test server.
set -euo pipefail
[ "$1 $2 $3 $4" = "compose exec -T db" ] || {{ echo "unexpected: docker $*" >&2; exit 64; }}
shift 4
[ "$1 $2" = "sh -c" ] || {{ echo "unexpected command: $*" >&2; exit 64; }}
export PATH="{pg_bin}:$PATH" PGHOST=127.0.0.1 PGPORT={port} POSTGRES_USER=postgres \\
    POSTGRES_DB=postgres
exec sh -c "$3"
"""


def test_backup_and_restore_round_trip_with_real_postgres(
    fresh_pg_server, repo: Path, tmp_path: Path
):
    from lab.postgres import PG_BIN

    stub(tmp_path, "docker", DOCKER_STUB.format(pg_bin=PG_BIN, port=fresh_pg_server.port))
    db.migrate(fresh_pg_server.url)  # the app's tables: answers, and the drawings behind them
    strokes = [[[70.5, 50.0], [210.0, 50.0]], [[207.0, 54.0], [120.0, 240.0]]]
    with fresh_pg_server.connect() as conn:
        for digit in (3, 7):
            conn.execute(
                "INSERT INTO predictions (predicted_digit, true_label, confidence)"
                " VALUES (%s, %s, 0.5)",
                (digit, digit),
            )
        conn.execute(
            "INSERT INTO drawings (prediction_id, strokes, canvas_size, brush_width, image)"
            " VALUES (2, %s, 280, 18, %s)",
            (Jsonb(strokes), bytes(range(256)) * 3 + bytes(16)),
        )

    def stored() -> tuple[list, list]:
        with fresh_pg_server.connect() as conn:
            digits = conn.execute("SELECT true_label FROM predictions ORDER BY id").fetchall()
            kept = conn.execute("SELECT prediction_id, strokes, image FROM drawings").fetchall()
        return [row[0] for row in digits], kept

    before = stored()
    result = run_script(repo, "backup-db.sh")
    assert result.returncode == 0, result.stderr
    (backup,) = (repo / "backups").glob("mnist-*.sql.gz")
    assert re.fullmatch(r"mnist-\d{8}T\d{6}Z\.sql\.gz", backup.name)
    dump = gzip.decompress(backup.read_bytes()).decode()
    assert "COPY public.predictions" in dump and "COPY public.drawings" in dump
    assert not list((repo / "backups").glob("*.partial"))

    with fresh_pg_server.connect() as conn:
        conn.execute("DELETE FROM predictions WHERE true_label = 7")  # and its drawing
        conn.execute(
            "INSERT INTO predictions (predicted_digit, true_label, confidence) VALUES (9, 9, 0.5)"
        )
    assert stored() == ([3, 9], [])
    result = run_script(repo, "restore-db.sh", str(backup))
    assert result.returncode == 0, result.stderr
    assert stored() == before == ([3, 7], [(2, strokes, bytes(range(256)) * 3 + bytes(16))])


def test_failed_backup_exits_non_zero_and_leaves_no_file(repo: Path, tmp_path: Path) -> None:
    stub(tmp_path, "docker", '#!/bin/sh\necho "-- partial"\necho boom >&2\nexit 1\n')
    result = run_script(repo, "backup-db.sh")
    assert result.returncode != 0
    assert list((repo / "backups").iterdir()) == []


def test_backup_keeps_only_the_newest(repo: Path, tmp_path: Path) -> None:
    out = repo / "backups"
    out.mkdir()
    old = [out / f"mnist-2020010{i}T000000Z.sql.gz" for i in range(1, 5)]
    for path in old:
        path.write_bytes(b"")
    stub(tmp_path, "docker", "#!/bin/sh\necho 'SELECT 1;'\n")
    result = run_script(repo, "backup-db.sh", KEEP="3")
    assert result.returncode == 0, result.stderr
    kept = sorted(p.name for p in out.iterdir())
    assert len(kept) == 3 and kept[:2] == [old[2].name, old[3].name], kept
    assert gzip.decompress((out / kept[2]).read_bytes()) == b"SELECT 1;\n"


def test_restore_rejects_a_missing_file(repo: Path, tmp_path: Path) -> None:
    result = run_script(repo, "restore-db.sh", str(tmp_path / "nope.sql.gz"))
    assert result.returncode == 2 and "Usage" in result.stderr


# --- GitHub Actions workflows and deploy/update.sh -----------------------------------------------


def deploy_steps() -> dict[str, str]:
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "deploy.yml").read_text())
    (job,) = workflow["jobs"].values()
    return {step["name"]: step["run"] for step in job["steps"] if "run" in step}


def run_step(script: str, tmp_path: Path, **env: str):
    """A workflow step's script run by bash as the runner does (-e, -o pipefail)."""
    files = {name: tmp_path / name for name in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY")}
    for path in files.values():
        path.write_text("")
    env |= {"PATH": f"{tmp_path / 'bin'}:{BASE_PATH}", "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        env={
            "PATH": f"{tmp_path / 'bin'}:{BASE_PATH}",
            "HOME": str(tmp_path),
            **{k: str(v) for k, v in files.items()},
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, files["GITHUB_OUTPUT"].read_text(), files["GITHUB_STEP_SUMMARY"].read_text()


def test_deploy_workflow_without_secrets_says_it_skips(tmp_path: Path) -> None:
    check = deploy_steps()["Check the deploy secrets"]
    unset = {"DEPLOY_HOST": "", "DEPLOY_USER": "", "DEPLOY_SSH_KEY": ""}
    result, output, summary = run_step(check, tmp_path, **unset)
    assert result.returncode == 0, result.stderr
    assert output == "ready=false\n"
    assert "::notice title=Deploy skipped::" in result.stdout
    assert "DEPLOY_HOST, DEPLOY_USER and DEPLOY_SSH_KEY" in summary
    result, output, _ = run_step(
        check, tmp_path, DEPLOY_HOST="h", DEPLOY_USER="u", DEPLOY_SSH_KEY="k"
    )
    assert output == "ready=true\n"


def test_deploy_workflow_runs_the_update_script_over_ssh(tmp_path: Path) -> None:
    update = deploy_steps()["Update the server with deploy/update.sh"]
    calls = tmp_path / "ssh.log"
    stub(tmp_path, "ssh", f'#!/bin/sh\nprintf "%s\\n" "$@" > "{calls}"\n')
    env = {"DEPLOY_HOST": "203.0.113.7", "DEPLOY_USER": "deployer", "DEPLOY_SSH_KEY": "KEY",
           "DEPLOY_KNOWN_HOSTS": "203.0.113.7 ssh-ed25519 AAAA", "DEPLOY_PATH": "srv/my app",
           "GITHUB_REF_NAME": "v1.2.0"}  # fmt: skip
    result, _, summary = run_step(update, tmp_path, **env)
    assert result.returncode == 0, result.stderr
    args = calls.read_text().splitlines()
    assert args[-2:] == ["deployer@203.0.113.7", r"cd srv/my\ app && deploy/update.sh"], args
    assert "StrictHostKeyChecking=yes" in args and "BatchMode=yes" in args
    assert (tmp_path / ".ssh" / "deploy_key").read_text() == "KEY\n"
    assert stat.S_IMODE((tmp_path / ".ssh" / "deploy_key").stat().st_mode) == 0o600
    assert "Deployed v1.2.0 to 203.0.113.7" in summary


@pytest.mark.docker
def test_update_script_deploys_a_new_commit_to_the_running_stack(tmp_path: Path) -> None:
    from lab.compose_project import ComposeProject, require_engine

    require_engine()
    server = ComposeProject(prefix="mnistupdate")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    try:
        # The server's checkout tracks "origin"; a developer pushes a commit there.
        origin, dev = tmp_path / "origin.git", tmp_path / "dev"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
        for command in ("init -q -b main", "add -A", "commit -qm deployed",
                        f"remote add origin {origin}", "push -qu origin main"):  # fmt: skip
            server.run([*git, *command.split()])
        server.run("docker compose up -d --build --wait")
        server.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        subprocess.run(["git", "clone", "-q", str(origin), str(dev)], check=True)
        (dev / "release.txt").write_text("v2\n")
        for command in ("add release.txt", "commit -qm v2", "push -q"):
            subprocess.run([*git, *command.split()], cwd=dev, check=True, capture_output=True)

        result = server.run(["deploy/update.sh"], timeout=900)
        assert "app health: ok" in result.stdout, result.stdout
        assert "now at" in result.stdout and " v2" in result.stdout
        assert server.compose("exec", "-T", "app", "cat", "release.txt").stdout == "v2\n"
        assert server.psql("SELECT x FROM kept") == "42"  # the database volume was kept
        states = server.compose("ps", "--format", "{{.Service}} {{.Health}}").stdout.split("\n")
        assert "app healthy" in states and "db healthy" in states, states
    finally:
        server.remove()


# --- stack-deploy.sh (the real deploy: tests/test_stack.py) --------------------------------------


def test_stack_deploy_refuses_bad_settings_and_a_non_manager_before_changing_anything(
    repo: Path, tmp_path: Path
) -> None:
    calls = tmp_path / "docker-calls"
    # `docker info` answers as a node outside any swarm; any other call is recorded.
    stub(tmp_path, "docker", f'echo "$*" >>{calls}\n[ "$1" = info ] && echo "inactive false"\n')
    cases = [
        ({}, "POSTGRES_PASSWORD is not set"),
        ({"POSTGRES_PASSWORD": "p"}, "APP_DB_PASSWORD is not set"),
        ({"POSTGRES_PASSWORD": "p", "APP_DB_PASSWORD": "a", "APP_REPLICAS": "two"},
         "APP_REPLICAS must be a positive number"),
        ({"POSTGRES_PASSWORD": "p", "APP_DB_PASSWORD": "a"}, "not a swarm manager"),
    ]  # fmt: skip
    for env, error in cases:
        result = run_script(repo, "stack-deploy.sh", **env)
        assert result.returncode == 1 and error in result.stderr, (env, result.stderr)
    assert run_script(repo, "stack-deploy.sh", "Bad/Name").returncode == 1
    # .env as compose reads it: the later line wins; the environment wins over the file.
    (repo / ".env").write_text("POSTGRES_PASSWORD=p\nAPP_DB_PASSWORD=a\nAPP_REPLICAS=2\n"
                               "APP_REPLICAS=two\n")  # fmt: skip
    assert "APP_REPLICAS must be" in run_script(repo, "stack-deploy.sh").stderr
    assert "not a swarm manager" in run_script(repo, "stack-deploy.sh", APP_REPLICAS="3").stderr
    assert set(calls.read_text().splitlines()) == {
        "info --format {{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}"
    }
