"""The trained model written: its weights to --out and what they are to model.json beside them
(how trained, on what, their figures), each file whole or absent."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from training.checkpoints import atomic_save, atomic_write_text
from training.config import TrainConfig
from training.loops import memory_mb

if TYPE_CHECKING:
    from training import sources

log = logging.getLogger("train")


@dataclass
class Trained:
    """What a run leaves: the model written, and the data it was trained and measured on."""

    path: Path  # the weights written
    info: dict  # what model.json says about them
    data: sources.Data


def write_model(
    net,
    config: TrainConfig,
    data: sources.Data,
    metrics: dict,
    trained_seconds: float,
    started: float,
    out: Path,
) -> dict:
    """The weights to `out` and what they are (how trained, on what, their figures) to
    `out`.json: model.json."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in (out.name, out.with_suffix(".json").name):
        for stale in out.parent.glob(f".{name}.*.tmp"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    atomic_save(net.state_dict(), out)
    _, peak = memory_mb()
    names = [source.name for source in data.sources]
    info = {
        "test_accuracy": round(metrics["test_accuracy"], 5),
        "test_ece": metrics.get("test_ece"),
        **{held.key: metrics[held.key] for held in data.held_out},
        "measured_through": "utils.preprocess"
        + (" + utils.trajectory" if net.trajectory is not None else "")
        + " + model.predict_batch",
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "init": str(config.init) if config.init else None,
        "epoch_size": config.epoch_size,
        "freeze_bn": config.freeze_bn,
        "distill": config.distill,
        "members": len(net.members),
        "trajectory_model": net.trajectory is not None,
        "trajectory_epochs": config.trajectory_epochs,
        "sources": names,
        "pen_share": config.pen_share if {"mnist", "pen"} <= set(names) else None,
        "pen_views": config.pen_views,
        "stroke_variation": config.stroke_variation,
        **(
            {
                "feedback_share": config.feedback_share if len(names) > 1 else None,
                "feedback_views": config.feedback_views,
                "feedback_rows_through_id": data.feedback_until,
            }
            if "feedback" in names
            else {}
        ),
        "training_images": {source.name: len(source.train) for source in data.sources},
        "training_seconds": round(trained_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in net.parameters()),
        "torch_version": torch.__version__,
    }
    atomic_write_text(json.dumps(info, indent=2) + "\n", out.with_suffix(".json"))
    log.info("model saved to %s (%s)", out, out.with_suffix(".json"))
    return info
