"""Checkpoints: one file per place in training, written whole or not at all, the newest that
loads resumed, the oldest pruned.

`checkpoint-e0004-s000120.pt`: 4 epochs complete and 120 steps of the fifth done (the epochs
after --epochs are the model of the strokes'). Each holds the weights, the optimizers' and
schedules' states, the random-number state, where training is, its figures so far and the
RUN_SETTINGS it was trained with: a run with other settings is refused, not resumed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from files import atomic_file
from training.config import SetupError

log = logging.getLogger("train")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-e(\d{4})-s(\d{6})\.pt$")
# What a checkpoint from before a setting existed was trained with.
OLD_SETTINGS = {"members": 1, "trajectory_epochs": 0}


def checkpoint_name(epoch: int, step: int) -> str:
    """`epoch` epochs are complete and `step` steps of the next one are done."""
    return f"checkpoint-e{epoch:04d}-s{step:06d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, newest (furthest in training) first."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), int(m.group(2)), path)
        for path in directory.iterdir()
        if (m := CHECKPOINT_PATTERN.match(path.name))
    ]
    return [path for _, _, path in sorted(found, reverse=True)]


def atomic_save(obj: object, path: Path) -> None:
    """torch.save, atomically (files.atomic_file): the file is whole or absent."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def atomic_write_text(text: str, path: Path) -> None:
    with atomic_file(path) as handle:
        handle.write(text.encode())


def save_checkpoint(state: dict, directory: Path, keep: int) -> Path:
    """`state` written as the checkpoint of its epoch and step; the newest `keep` kept."""
    path = directory / checkpoint_name(state["epoch"], state["step"])
    atomic_save(state, path)
    prune_checkpoints(directory, keep)
    return path


def load_newest_checkpoint(directory: Path, settings: dict) -> dict | None:
    """The newest checkpoint that loads, skipping (and reporting) corrupt ones."""
    for path in list_checkpoints(directory):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "model" not in state:
                raise ValueError("not a checkpoint written by train.py")
        except Exception as exc:  # any unreadable file is skipped, never fatal
            log.warning("skipping corrupt checkpoint %s: %s", path.name, exc)
            continue
        saved = {**OLD_SETTINGS, **(state.get("settings") or {})}
        if (sources := saved.get("sources", ["mnist"])) != settings["sources"]:
            raise SetupError(
                f"{path} was written by a run trained on {'+'.join(sources)}"
                f"; this run asks for {'+'.join(settings['sources'])}. A model cannot switch data "
                f"half-way: use the same --sources, another --checkpoint-dir, or --fresh."
            )
        if saved != settings:
            raise SetupError(
                f"{path} was written by a run with other settings ({state.get('settings')}); "
                f"this run has {settings}. Use the same flags, another --checkpoint-dir, "
                f"or --fresh to start over."
            )
        state["path"] = path
        return state
    return None


def prune_checkpoints(directory: Path, keep: int) -> None:
    for path in list_checkpoints(directory)[keep:]:
        path.unlink(missing_ok=True)
    for stale in directory.glob(".checkpoint-*.tmp"):
        stale.unlink(missing_ok=True)
