"""The project as a Docker Swarm stack on a single-node swarm of this engine, for tests.

``single_node_swarm()``: ``docker swarm init --advertise-addr 127.0.0.1`` for the block,
``docker swarm leave --force`` after (and the ``docker_gwbridge`` network the init created). The
node gets the label ``mnist.test-swarm``: a swarm that carries it was left by a killed run and is
taken down first; any other swarm is someone's own, and is never touched.

``SwarmStack(project, name)``: deploys ``deploy/stack.yml`` from a ``ComposeProject`` copy with
``deploy/stack-deploy.sh NAME`` as a person runs it (settings in the copy's ``.env``); ``tasks``,
``logs``, ``psql``, ``replica_of_cookie`` (which replica Caddy's ``lb`` cookie names); ``remove()``
takes down the stack and everything it created (services, volumes, secrets, configs, networks).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from lab import free_port
from lab.compose_project import ComposeProject

TEST_LABEL = "mnist.test-swarm"


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr.strip()[-2000:]}")
    return result.stdout.strip()


def swarm_state() -> str:
    return docker("info", "--format", "{{.Swarm.LocalNodeState}}")


def _leave() -> None:
    docker("swarm", "leave", "--force", check=False, timeout=120)
    # The bridge that `swarm init` created; containers of compose projects never use it.
    docker("network", "rm", "docker_gwbridge", check=False)


@contextlib.contextmanager
def single_node_swarm() -> Iterator[None]:
    if swarm_state() == "active":
        node = docker("info", "--format", "{{.Swarm.NodeID}}")
        labels = docker("node", "inspect", "--format", "{{json .Spec.Labels}}", node)
        if TEST_LABEL not in labels:
            raise AssertionError("this engine is in a swarm of its own: the tests leave it alone")
        for stack in docker("stack", "ls", "--format", "{{.Name}}").split():
            remove_stack(stack)
        _leave()
    docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    try:
        node = docker("info", "--format", "{{.Swarm.NodeID}}")
        docker("node", "update", "--label-add", f"{TEST_LABEL}=1", node)
        yield
    finally:
        _leave()


@dataclass(frozen=True)
class Task:
    container: str
    name: str  # <stack>_app.<slot>.<task id>
    frontend_ip: str


class SwarmStack:
    def __init__(self, project: ComposeProject, name: str, replicas: int):
        self.project, self.name = project, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with (project.dir / ".env").open("a") as env:
            env.write(f"\nAPP_REPLICAS={replicas}\nHTTP_PORT={self.port}\n")

    def deploy(self, *env: str, timeout: float = 600) -> str:
        """``deploy/stack-deploy.sh NAME``; *env*: ``KEY=VALUE`` that win over ``.env``."""
        argv = ["env", *env, "deploy/stack-deploy.sh", self.name]
        return self.project.run(argv, timeout=timeout).stdout

    def tasks(self, service: str = "app") -> list[Task]:
        """The running containers of *service* on this node."""
        listed = docker(
            "ps", "--filter", f"label=com.docker.swarm.service.name={self.name}_{service}",
            "--format", "{{.ID}} {{.Names}}",
        )  # fmt: skip
        network = f"{self.name}_frontend"
        template = f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}'
        tasks = []
        for line in listed.splitlines():
            container, name = line.split()
            ip = docker("inspect", "--format", template, container, check=False)
            tasks.append(Task(container, name, ip if ip != "<no value>" else ""))
        return tasks

    def replica_of_cookie(self, cookie: str) -> Task | None:
        """The task Caddy's ``lb`` cookie points at: HMAC-SHA256 (empty key, Caddy 2.6's
        default) of the upstream's address."""
        for task in self.tasks():
            address = f"{task.frontend_ip}:8501".encode()
            if hmac.new(b"", address, hashlib.sha256).hexdigest() == cookie:
                return task
        return None

    @staticmethod
    def logs(container: str) -> str:
        result = subprocess.run(
            ["docker", "logs", container], capture_output=True, text=True, timeout=60
        )
        return result.stdout + result.stderr

    def psql(self, sql: str) -> str:
        """*sql* run by the superuser in the db task's container; psql's unaligned output."""
        (db,) = self.tasks("db")
        script = 'psql -v ON_ERROR_STOP=1 -qAt -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "$1"'
        return docker("exec", db.container, "sh", "-c", script, "sh", sql)

    def wait_for_replicas(self, count: int, timeout: float = 300) -> list[Task]:
        """Until *count* app tasks run and are healthy (their health check passed)."""
        deadline = time.monotonic() + timeout
        while True:
            tasks = self.tasks()
            health = [
                docker("inspect", "--format", "{{.State.Health.Status}}", t.container, check=False)
                for t in tasks
            ]
            if health.count("healthy") == count == len(tasks):
                return tasks
            if time.monotonic() > deadline:
                history = docker(
                    "service", "ps", "--no-trunc", f"{self.name}_app",
                    "--format", "{{.Name}} {{.CurrentState}} {{.Error}}",
                    check=False,
                )  # fmt: skip
                raise AssertionError(f"{count} healthy replicas expected: {health}\n{history}")
            time.sleep(1)

    def stop(self) -> None:
        """``docker stack rm``, until its containers and networks are gone (volumes stay)."""
        stop_stack(self.name)

    def remove(self) -> None:
        remove_stack(self.name)


def stop_stack(name: str) -> None:
    docker("stack", "rm", name, check=False)
    label = f"label=com.docker.stack.namespace={name}"
    for _ in range(120):
        containers = docker("ps", "--all", "--quiet", "--filter", label, check=False)
        networks = docker("network", "ls", "--quiet", "--filter", label, check=False)
        if not containers and not networks:
            return
        time.sleep(1)
    raise AssertionError(f"stack {name}: containers {containers} networks {networks} remain")


def remove_stack(name: str) -> None:
    """The stack *name* and all it leaves behind: volumes, secrets, configs."""
    with contextlib.suppress(AssertionError):
        stop_stack(name)
    label = f"label=com.docker.stack.namespace={name}"
    for volume in docker("volume", "ls", "--quiet", "--filter", label, check=False).split():
        docker("volume", "rm", "--force", volume, check=False)
    for kind in ("secret", "config"):
        for item in docker(kind, "ls", "--format", "{{.Name}}", check=False).split():
            if item.startswith(f"{name}_"):
                docker(kind, "rm", item, check=False)
