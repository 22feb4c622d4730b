"""--promote: the candidate goes live only if `registry.promotion.promote` finds it better than
the live model on the same sets (held-out feedback first, MNIST's test set, the held-out pen
writers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import db
import utils
from registry import promotion, store
from training import sources
from training.checkpoints import atomic_write_text
from training.config import TrainConfig
from training.model_file import Trained

log = logging.getLogger("train")


def candidate_path(config: TrainConfig) -> Path:
    """Where --promote keeps the new model until promotion decides (the live one stays)."""
    return config.checkpoint_dir / f"candidate{config.out.suffix}"


def eval_sets(config: TrainConfig, data: sources.Data | None = None) -> dict:
    """The sets a candidate is compared on, as the app reads each: the held-out feedback
    (primary; from `data` if it trained on feedback, else read from the database), MNIST's test
    set and the held-out pen writers (from `data` if given, else loaded as `config` says)."""
    held_out = {h.key: h for h in data.held_out} if data else {}
    held_feedback = held_out.get("feedback_held_out")
    if held_feedback is None:  # trained without feedback: its held-out part is still the test
        try:
            conninfo = db.resolve_conninfo(owner=True)
            held_feedback = sources.feedback_held_out(sources.read_feedback(conninfo))
        except sources.FeedbackError as exc:
            log.warning("no held-out feedback to compare on: %s", exc)
            held_feedback = sources.feedback_held_out([])
    held_pen = held_out.get("pen_held_out") or sources.pen_held_out(config)
    test = data.test if data else sources.mnist_test(config)

    def eval_set(images: sources.Images, primary: bool = False):
        return promotion.EvalSet(
            utils.normalize(images.images)[:, None],
            images.labels,
            primary,
            getattr(images, "trajectories", None),
        )

    return {
        "held-out feedback": eval_set(held_feedback, primary=True),
        "MNIST test": eval_set(test),
        "held-out pen writers": eval_set(held_pen or sources.Images.empty()),
    }


def promote(config: TrainConfig, trained: Trained) -> int:
    """Hand the candidate to `promotion.promote` with the sets to compare it on; the exit
    code."""
    return decide(config, trained.path, trained.info, eval_sets(config, trained.data))


def judge(config: TrainConfig, prefix: str) -> int:
    """A version already registered (`prefix` of its hash), judged against the live one now by
    the same rule, with the evidence there is now: the held-out feedback as it stands and its
    answers in shadow, if it ran in shadow (`python versions.py promote PREFIX`); the exit
    code."""
    with store.connect(db.resolve_conninfo(owner=True)) as conn:
        sha = store.resolve(conn, prefix)
        weights, info = store.weights_of(conn, sha)
    path = config.checkpoint_dir / f"judged{config.out.suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_model_files(weights, info, path)
    return decide(config, path, info, eval_sets(config))


def decide(config: TrainConfig, path: Path, info: dict, sets: dict) -> int:
    """`promotion.promote` of the candidate at `path` on `sets`: logged, reported (--report),
    and on promotion its model.json beside --out; the exit code."""
    result = promotion.promote(
        path, info, sets, conninfo=db.resolve_conninfo(owner=True), out=config.out
    )
    log.info("promotion:\n%s", result.table)
    if config.report is not None:
        write_report(config.report, result)
    if not result.promoted:
        log.warning(
            "not promoted: the live model (%s) stays; the candidate is %s",
            str(result.live_sha256)[:12],
            path,
        )
        return promotion.EXIT_REFUSED
    atomic_write_text(json.dumps(info, indent=2) + "\n", config.out.with_suffix(".json"))
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
