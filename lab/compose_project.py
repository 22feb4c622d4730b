"""A throwaway copy of the project, run with the real ``docker compose``, for tests and benchmarks.

``ComposeProject()`` copies the checkout (the files git tracks or would track) to a temporary
directory with an ``.env`` of its own: random passwords, the app on a free port of 127.0.0.1, its
own image tag and compose project name; its ``data/`` and ``models/`` belong to the containers'
user (or ``TRAIN_UID``/``TRAIN_GID`` name the caller). ``run("docker compose up -d ...")`` runs a
command as a person types it there; ``compose(*args)``, ``psql(sql)`` (as the superuser, in the
``db`` container), ``inspect``, ``logs``; ``remove()`` takes it all down and deletes it. Stacks
left by a killed run are taken down first. On a machine without a registry
(../shared/docker/offline-engine.sh exports ``TORCH_INDEX_URL``) builds go through an override
that adds host networking and that index. ``require_engine()``: in a test, fail without an
engine under CI=true, else skip.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from lab import free_port

ROOT = Path(__file__).resolve().parents[1]
# What docker and compose need from the caller's environment; nothing else leaks in (a
# POSTGRES_PASSWORD or DATABASE_URL of the test process would override .env).
PASSED_ENV = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_BUILDKIT", "TMPDIR")
BUILD_OVERRIDE = """\
# Written by lab/compose_project.py: builds reach the loopback torch index (offline engine).
services:
  app:
    build: &build
      context: .
      network: host
      args:
        TORCH_INDEX_URL: {index}
  migrate:
    build: *build
"""


def engine_problem() -> str | None:
    """None when `docker compose` can talk to an engine, else what is missing."""
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        compose = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if info.returncode != 0:
        return f"no Docker engine: {info.stderr.strip()[-300:]}"
    if compose.returncode != 0:
        return f"no Compose plugin: {compose.stderr.strip()[-300:]}"
    return None


def require_engine() -> None:
    """In a test: fail without an engine under CI=true (CI must run these tests), else skip."""
    import pytest

    if problem := engine_problem():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs a Docker engine for this test: {problem}")
        pytest.skip(f"{problem} (bash .ci/run starts one)")


def checkout_files(root: Path = ROOT) -> list[str]:
    """The checkout's files as a fresh clone plus local edits has them (ignored ones left out)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


def remove_stale(prefix: str) -> None:
    """Take down projects named *prefix*... whose directory is gone (a run killed mid-test)."""
    label = "com.docker.compose.project"
    template = f'{{{{.Label "{label}"}}}} {{{{.Label "{label}.working_dir"}}}}'
    listed = subprocess.run(
        ["docker", "ps", "--all", "--filter", f"label={label}", "--format", template],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for name, _, directory in sorted({tuple(line.partition(" ")) for line in listed.splitlines()}):
        if name.startswith(prefix) and not Path(directory).exists():
            subprocess.run(
                ["docker", "compose", "-p", name, "down", "--volumes", "--remove-orphans"],
                capture_output=True,
                timeout=120,
            )


class ComposeProject:
    def __init__(self, prefix: str = "mnisttest"):
        remove_stale(prefix)
        self.name = f"{prefix}{secrets.token_hex(3)}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.dir.chmod(0o755)
        for name in checkout_files():
            target = self.dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
        self.image = f"{prefix}-app:latest"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.overrides: list[str] = []
        settings = {
            "POSTGRES_PASSWORD": secrets.token_hex(16),
            "APP_DB_PASSWORD": secrets.token_hex(16),
            "APP_BIND": "127.0.0.1",
            "APP_PORT": str(self.port),
            "APP_IMAGE": self.image,
        }
        (self.dir / "data").mkdir(exist_ok=True)
        (self.dir / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "1000:1000", "data", "models"], cwd=self.dir, check=True)
        else:
            settings |= {"TRAIN_UID": str(os.getuid()), "TRAIN_GID": str(os.getgid())}
        example = (self.dir / ".env.example").read_text()
        lines = [line for line in example.splitlines() if line.split("=")[0] not in settings]
        (self.dir / ".env").write_text(
            "\n".join([*lines, *(f"{k}={v}" for k, v in settings.items())])
        )
        (self.dir / ".env").chmod(0o600)
        if index := os.environ.get("TORCH_INDEX_URL"):
            self.add_override("build-host.yml", BUILD_OVERRIDE.format(index=index))

    def add_override(self, name: str, text: str) -> Path:
        """A compose file applied after the shipped one (through COMPOSE_FILE)."""
        path = self.dir / name
        path.write_text(text)
        if name not in self.overrides:
            self.overrides.append(name)
        return path

    def environment(self) -> dict[str, str]:
        env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
        env["COMPOSE_PROJECT_NAME"] = self.name
        env["COMPOSE_FILE"] = ":".join(["docker-compose.yml", *self.overrides])
        return env

    def run(self, command: str | list[str], *, check: bool = True, timeout: float = 600):
        """Run a command (a string as typed in a shell, or argv) in the project directory."""
        argv = shlex.split(command) if isinstance(command, str) else command
        result = subprocess.run(
            argv,
            cwd=self.dir,
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} exited {result.returncode}\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def compose(self, *args: str, check: bool = True, timeout: float = 600):
        return self.run(["docker", "compose", *args], check=check, timeout=timeout)

    def psql(self, sql: str) -> str:
        """*sql* run by the database superuser in the db container; psql's unaligned output."""
        script = 'psql -v ON_ERROR_STOP=1 -qAt -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "$1"'
        return self.compose("exec", "-T", "db", "sh", "-c", script, "sh", sql).stdout.strip()

    def container(self, service: str) -> str:
        """The id of the service's (only) container, running or not."""
        ids = self.compose("ps", "--all", "--quiet", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def inspect(self, service: str, template: str) -> str:
        result = self.run(["docker", "inspect", "--format", template, self.container(service)])
        return result.stdout.strip()

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout

    def down(self) -> None:
        self.compose(
            "--profile", "train", "--profile", "learn", "down", "--volumes", "--remove-orphans",
            "--timeout", "20",
            check=False,
        )  # fmt: skip

    def remove(self) -> None:
        """down(), then delete the directory (files written by the containers' user included)."""
        self.down()
        shutil.rmtree(self.dir, ignore_errors=True)
