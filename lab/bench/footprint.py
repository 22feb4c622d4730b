"""Footprint: bytes installed for requirements.txt and everything it pulls in (CPU torch);
and, on a Docker engine (section "containers"), the image, its build, the stack's start and the
train container's memory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from importlib import metadata

from packaging.requirements import Requirement

from lab.bench.common import ROOT, Row

SECTION = "Footprint"


def runtime_requirements() -> list[Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions of *requirements* and their dependencies (markers and extras
    evaluated for this interpreter), by normalised name."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(req, frozenset(req.extras)) for req in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, extras = todo.pop()
        key = _key(req.name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        dist = found.get(key) or metadata.distribution(req.name)
        found[key] = dist
        for text in dist.requires or []:
            dep = Requirement(text)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in environments):
                todo.append((dep, frozenset(dep.extras)))
    return found


def installed_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        path = dist.locate_file(file)
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            pass
    return total


def run() -> list[Row]:
    dists = closure(runtime_requirements())
    sizes = {dist.metadata["Name"]: installed_bytes(dist) for dist in dists.values()}
    total_mb = sum(sizes.values()) / 2**20
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:4]
    biggest = ", ".join(f"{name} {size / 2**20:.0f}" for name, size in largest)
    torch_version = metadata.version("torch")
    return [
        Row(SECTION, "installed runtime dependencies", total_mb, "MB",
            note=f"{len(sizes)} distributions from requirements.txt (torch {torch_version}); "
            f"largest (MB): {biggest}"),
    ]  # fmt: skip


# --- containers (a real Docker engine; section "containers") ----------------------------------

CONTAINERS = "Containers"
TRAIN_LIMIT_MB = 2048  # docker-compose.yml, train: deploy.resources.limits.memory


# Run inside the train container after train.py: its cgroup's peak memory (v1, else v2), which
# counts every process of the container (DataLoader workers too) and the page cache it used.
PEAK_WRAPPER = (
    '"$@"; rc=$?; for f in /sys/fs/cgroup/memory/memory.max_usage_in_bytes '
    '/sys/fs/cgroup/memory.peak; do [ -r "$f" ] && echo "cgroup-peak $(cat "$f")" && break; '
    "done; exit $rc"
)


def _train_run(project, command: list[str], shm: str | None = None) -> dict:
    """Run the train service (as `docker compose --profile train up -d train` does) with
    *command*, then its cgroup's peak memory; /dev/shm use is sampled every 0.5 s meanwhile."""
    # $$: compose would otherwise substitute the shell's $ variables itself.
    service = {"command": ["sh", "-c", PEAK_WRAPPER.replace("$", "$$"), "sh", *command]}
    if shm:
        service["shm_size"] = shm
    project.add_override("train-bench.yml", json.dumps({"services": {"train": service}}))
    project.compose("--profile", "train", "rm", "--stop", "--force", "train")
    for path in (project.dir / "models" / "checkpoints").glob("*"):
        path.unlink()
    started = time.perf_counter()
    project.run("docker compose --profile train up -d train")
    container = project.container("train")
    shm_peak = 0
    while project.inspect("train", "{{.State.Running}}") == "true":
        df = project.run(["docker", "exec", container, "df", "-k", "/dev/shm"], check=False)
        if df.returncode == 0:
            shm_peak = max(shm_peak, int(df.stdout.splitlines()[-1].split()[2]) * 1024)
        time.sleep(0.5)
    state = json.loads(project.inspect("train", "{{json .State}}"))
    logs = project.logs("train")
    peak = re.findall(r"cgroup-peak (\d+)", logs)
    return {
        "exit": state["ExitCode"],
        "oom": state["OOMKilled"],
        "seconds": time.perf_counter() - started,
        "peak_mb": int(peak[-1]) / 2**20 if peak else None,
        "shm_peak_mb": shm_peak / 2**20,
        "shm_mb": int(project.inspect("train", "{{.HostConfig.ShmSize}}")) / 2**20,
        "bus_error": "bus error" in logs.lower(),
        "log_peak": (re.findall(r"peak (\d+) MB", logs) or ["?"])[-1],
    }


def containers() -> list[Row]:
    """Image size, build times, `up --wait` to healthy, and the train container's memory."""
    from lab.bench.common import mnist_dir
    from lab.compose_project import ComposeProject, engine_problem

    if problem := engine_problem():
        return [Row(CONTAINERS, "containers", None, "", note=f"skipped: {problem}")]
    rows: list[Row] = []
    project = ComposeProject(prefix="mnistbench")
    try:
        build = ["docker", "compose", "build", "--no-cache", "app"]
        start = time.perf_counter()
        project.run(build, timeout=1800)
        cold = time.perf_counter() - start
        with (project.dir / "app.py").open("a") as code:
            code.write("\n# a code change\n")
        start = time.perf_counter()
        project.compose("build", "app", timeout=1800)
        cached = time.perf_counter() - start
        size = int(project.run(["docker", "image", "inspect", "--format", "{{.Size}}",
                                project.image]).stdout)  # fmt: skip
        rows += [
            Row(CONTAINERS, "image size", size / 1e6, "MB", note=project.image),
            Row(CONTAINERS, "image build, no cache (base image present)", cold, "s",
                note="torch from the index of TORCH_INDEX_URL, the rest from PyPI"),
            Row(CONTAINERS, "image build after a code change (dependency layer cached)", cached,
                "s"),
        ]  # fmt: skip
        start = time.perf_counter()
        project.run("docker compose up -d --wait")
        rows.append(Row(CONTAINERS, "`docker compose up -d --wait`: nothing running to app and "
                        "db healthy", time.perf_counter() - start, "s"))  # fmt: skip
        project.down()

        import pendigits

        source = mnist_dir()
        pen_file = pendigits.default_path()
        pen_file = pen_file if pen_file.is_absolute() else ROOT / pen_file
        if source is None or not pen_file.is_file():
            note = "skipped: no MNIST or pen digits (MNIST_DIR, PENDIGITS_DIR)"
            rows.append(Row(CONTAINERS, "train container", None, "", note=note))
            return rows
        shutil.copytree(source, project.dir / "data" / "mnist", dirs_exist_ok=True)
        (project.dir / "data" / "pendigits").mkdir(exist_ok=True)
        shutil.copy2(pen_file, project.dir / "data" / "pendigits" / pendigits.FILE_NAME)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "1000:1000", "data"], cwd=project.dir, check=True)
        config = project.compose("--profile", "train", "config", "--format", "json").stdout
        # 10,000 images: the whole MNIST is loaded and the final evaluation is the default one,
        # so the peak is that of a full run, in a sixth of an epoch's time.
        short = [*json.loads(config)["services"]["train"]["command"], "--epochs", "1",
                 "--limit", "10000"]  # fmt: skip
        for label, flags, shm in (
            ("default command (`--workers 0`)", short, None),
            ("`--workers 2`", [*short, "--workers", "2"], None),
            ("`--workers 2`, Docker's default 64 MB /dev/shm", [*short, "--workers", "2"], "64m"),
        ):
            run = _train_run(project, flags, shm)
            outcome = f"exit {run['exit']}" + (", OOM-killed" if run["oom"] else "")
            outcome += ", bus error" if run["bus_error"] else ""
            rows.append(Row(
                CONTAINERS, f"train container peak memory (cgroup), {label}, 1 epoch of 10k",
                run["peak_mb"], "MB", f"<= {TRAIN_LIMIT_MB} MB (its limit)",
                run["peak_mb"] is not None and run["peak_mb"] <= TRAIN_LIMIT_MB,
                note=f"{outcome}; {run['seconds']:.0f} s; /dev/shm {run['shm_mb']:.0f} MB, "
                f"peak use {run['shm_peak_mb']:.1f} MB; train.py's RSS peak {run['log_peak']} MB",
            ))  # fmt: skip
    finally:
        project.remove()
    return rows
