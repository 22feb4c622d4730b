"""Footprint: bytes installed for requirements.txt and everything it pulls in (CPU torch)."""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement

from bench.common import ROOT, Row

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
