"""--promote: the candidate goes live only if `registry.promotion.promote` finds it better than
the live model on the same sets (held-out feedback first, MNIST's test set, the held-out pen
writers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import db
import utils
from registry import promotion
from training import sources
from training.checkpoints import atomic_write_text
from training.config import TrainConfig
from training.model_file import Trained

log = logging.getLogger("train")


def candidate_path(config: TrainConfig) -> Path:
    """Where --promote keeps the new model until promotion decides (the live one stays)."""
    return config.checkpoint_dir / f"candidate{config.out.suffix}"


def promote(config: TrainConfig, trained: Trained) -> int:
    """Hand the candidate to `promotion.promote` with the sets to compare it on; the exit
    code."""
    data = trained.data
    held_feedback = next((h for h in data.held_out if h.key == "feedback_held_out"), None)
    if held_feedback is None:  # trained without feedback: its held-out part is still the test
        try:
            conninfo = db.resolve_conninfo(owner=True)
            held_feedback = sources.feedback_held_out(sources.read_feedback(conninfo))
        except sources.FeedbackError as exc:
            log.warning("no held-out feedback to compare on: %s", exc)
            held_feedback = sources.feedback_held_out([])
    held_pen = next((h for h in data.held_out if h.key == "pen_held_out"), None)
    held_pen = held_pen or sources.pen_held_out(config) or sources.Images.empty()

    def eval_set(images: sources.Images, primary: bool = False):
        return promotion.EvalSet(
            utils.normalize(images.images)[:, None],
            images.labels,
            primary,
            getattr(images, "trajectories", None),
        )

    eval_sets = {
        "held-out feedback": eval_set(held_feedback, primary=True),
        "MNIST test": eval_set(data.test),
        "held-out pen writers": eval_set(held_pen),
    }
    result = promotion.promote(
        trained.path,
        trained.info,
        eval_sets,
        conninfo=db.resolve_conninfo(owner=True),
        out=config.out,
    )
    log.info("promotion:\n%s", result.table)
    if config.report is not None:
        write_report(config.report, result)
    if not result.promoted:
        log.warning(
            "not promoted: the live model (%s) stays; the candidate is %s",
            str(result.live_sha256)[:12],
            trained.path,
        )
        return promotion.EXIT_REFUSED
    atomic_write_text(json.dumps(trained.info, indent=2) + "\n", config.out.with_suffix(".json"))
    log.info("promoted %s: now live, and in %s", str(result.candidate_sha256)[:12], config.out)
    return 0


def write_report(path: Path, result: promotion.PromotionResult) -> None:
    """The promotion's verdict, as --report asks: promoted or not, why not, the candidate and
    the live model compared, each set's comparison and the printed table (JSON, atomically)."""
    report = {
        "promoted": result.promoted,
        "reasons": list(result.reasons),
        "candidate": result.candidate_sha256,
        "compared_with": result.live_sha256,
        "sets": list(result.sets),
        "table": result.table,
    }
    atomic_write_text(json.dumps(report, indent=2) + "\n", path)
