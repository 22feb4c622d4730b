"""The promotion rule: a candidate becomes the live version only if it is better.

``promote()`` (``train.py --promote``) registers the candidate as a version (registry/store.py),
compares it with the live model on the same evaluation sets and on the answers it gave in shadow
beside the live model (``shadow_comparison``), prints the table and makes it live only by
``refusals()``'s rule (docs/promotion.md, "The promotion rule").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import torch

import model as model_lib
from feedback import is_held_out
from registry.store import (
    PROMOTION_LOCK_KEY,
    connect,
    ensure_live,
    live_sha,
    load_weights,
    percent,
    record,
    register,
    version_name,
    weights_of,
    write_model_files,
)

log = logging.getLogger("versions")  # the registry's logger (registry/store.py)

EXIT_REFUSED = 3  # train.py --promote: the candidate was refused; nothing changed
PRIMARY = "held-out feedback"  # the set a candidate must be better on (EvalSet.paired_primary)
SHADOW = "shadow answers"  # its answers in shadow beside the live model: pooled with PRIMARY
# The rule (docs/promotion.md, "The promotion rule"): one-sided exact sign tests on the drawings
# that exactly one of the two models reads right.
GUARD_ALPHA = 0.05  # a set's overall loss this unlikely under "equally good" refuses
PER_DIGIT_ALPHA = 0.005  # a digit's loss on a set, likewise (0.05 over 10 digits: Bonferroni)


@dataclass(frozen=True)
class EvalSet:
    images: torch.Tensor  # (N, 1, 28, 28) float, normalised as utils.normalize does
    labels: torch.Tensor  # (N,) int64
    paired_primary: bool = False  # the held-out feedback: the candidate must be better on it
    # Their trajectories (N, 5, points) as utils.trajectory gives them, read as the app reads
    # them by a model that has the model of the strokes; None: the images alone.
    trajectories: torch.Tensor | None = None


@dataclass(frozen=True)
class Paired:
    """Two models on the same images: how many each reads right, and how many only one does."""

    count: int
    live: int
    candidate: int
    only_live: int
    only_candidate: int

    @classmethod
    def of(cls, live_right: torch.Tensor, candidate_right: torch.Tensor) -> Paired:
        return cls(
            count=len(live_right),
            live=int(live_right.sum()),
            candidate=int(candidate_right.sum()),
            only_live=int((live_right & ~candidate_right).sum()),
            only_candidate=int((candidate_right & ~live_right).sum()),
        )

    def p_worse(self) -> float:
        """One-sided sign test: the chance of this many live-only reads (or more) among the
        discordant drawings if both models were equally good."""
        return sign_test(self.only_live, self.only_live + self.only_candidate)

    def p_better(self) -> float:
        return sign_test(self.only_candidate, self.only_live + self.only_candidate)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def __add__(self, other: Paired) -> Paired:
        """Both sets of drawings together (rule 1 pools its sets)."""
        return Paired(**{key: value + getattr(other, key) for key, value in self.__dict__.items()})


@dataclass(frozen=True)
class SetComparison:
    name: str
    primary: bool
    overall: Paired
    by_digit: dict[int, Paired] = field(default_factory=dict)
    live_loss: float | None = None  # mean cross-entropy of the true labels
    candidate_loss: float | None = None
    # The same once each model's confidence is calibrated on the sets neither trained on
    # (`calibrate`): what rule 1 compares when the drawings cannot tell the models apart.
    live_calibrated: float | None = None
    candidate_calibrated: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "primary": self.primary,
            **self.overall.as_dict(),
            "live_loss": self.live_loss,
            "candidate_loss": self.candidate_loss,
            "live_calibrated": self.live_calibrated,
            "candidate_calibrated": self.candidate_calibrated,
            "by_digit": {str(d): paired.as_dict() for d, paired in self.by_digit.items()},
        }


def sign_test(successes: int, trials: int) -> float:
    """P(X >= successes) for X ~ Binomial(trials, 1/2), exactly (1.0 without trials)."""
    if trials <= 0 or successes <= 0:
        return 1.0
    return sum(math.comb(trials, k) for k in range(successes, trials + 1)) / 2**trials


def log_probabilities(
    net: torch.nn.Module,
    images: torch.Tensor,
    batch: int = 1000,
    trajectories: torch.Tensor | None = None,
):
    """What `net` makes of each image (with its trajectory, where given and `net` has the model
    of the strokes)."""
    net.eval()
    out = []
    reads_strokes = trajectories is not None and getattr(net, "trajectory", None) is not None
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            inputs = [images[start : start + batch].float()]
            if reads_strokes:
                inputs.append(trajectories[start : start + batch])
            out.append(torch.log_softmax(net(*inputs), dim=1))
    return torch.cat(out) if out else torch.empty((0, 10))


def calibrate(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T that makes `log_probs` (N, 10) most likely for `labels` once scaled,
    softmax(log_probs / T) (temperature scaling, Guo et al., 2017): above 1 for a model surer
    than its answers are right, below 1 for one less sure. 1 without drawings."""
    if not len(labels):
        return 1.0

    def loss(log_t: float) -> float:
        scaled = torch.log_softmax(log_probs / math.exp(log_t), dim=1)
        return float(torch.nn.functional.nll_loss(scaled, labels))

    low, high = math.log(0.05), math.log(20.0)  # golden-section search on log T
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if loss(a) < loss(b) else (a, high)
    return math.exp((low + high) / 2)


def calibrated_loss(log_probs: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    scaled = torch.log_softmax(log_probs / temperature, dim=1)
    return float(torch.nn.functional.nll_loss(scaled, labels))


def compare(
    live: torch.nn.Module, candidate: torch.nn.Module, eval_sets: Mapping[str, EvalSet]
) -> list[SetComparison]:
    """Both models on every set: each set's paired counts, overall and per digit, and mean
    losses; the primary set's also calibrated, each model's temperature fitted on the other
    sets (drawings neither model trained on: MNIST's test set, the held-out pen writers)."""
    outputs = {
        name: [
            log_probabilities(net, eval_set.images, trajectories=eval_set.trajectories)
            for net in (live, candidate)
        ]
        for name, eval_set in eval_sets.items()
    }
    neutral = [name for name, eval_set in eval_sets.items() if not eval_set.paired_primary]
    labels_of = {name: eval_set.labels.long() for name, eval_set in eval_sets.items()}
    temperatures = [
        calibrate(
            torch.cat([outputs[name][model] for name in neutral] or [torch.empty((0, 10))]),
            torch.cat([labels_of[name] for name in neutral] or [torch.empty(0, dtype=torch.long)]),
        )
        for model in (0, 1)
    ]
    results = []
    for name, eval_set in eval_sets.items():
        labels = labels_of[name]
        live_out, candidate_out = outputs[name]
        live_right = live_out.argmax(1) == labels
        candidate_right = candidate_out.argmax(1) == labels
        by_digit = {
            digit: Paired.of(live_right[labels == digit], candidate_right[labels == digit])
            for digit in sorted(set(labels.tolist()))
        }
        losses = [
            float(torch.nn.functional.nll_loss(out, labels)) if len(labels) else None
            for out in (live_out, candidate_out)
        ]
        calibrated = [
            calibrated_loss(out, labels, temperature)
            if eval_set.paired_primary and len(labels)
            else None
            for out, temperature in zip((live_out, candidate_out), temperatures, strict=True)
        ]
        overall = Paired.of(live_right, candidate_right)
        results.append(
            SetComparison(name, eval_set.paired_primary, overall, by_digit, *losses, *calibrated)
        )
    return results


def shadow_comparison(conn: psycopg.Connection, live: str, candidate: str) -> SetComparison | None:
    """The answers stored while the version *candidate* ran in shadow beside the live version
    *live* (``predictions.shadow_model`` and ``.model`` name them): each drawing read by both in
    the app, neither trained on it (both were versions before they read it), judged by the
    person's true label. A primary set, pooled with the held-out feedback by rule 1. An answer
    of a held-out submission whose drawing was kept is left out: the held-out feedback may hold
    that drawing too, and no drawing counts twice. None without such answers."""
    rows = conn.execute(
        "SELECT p.id, p.submission_id, p.true_label, p.predicted_digit, p.shadow_digit,"
        " EXISTS (SELECT 1 FROM drawings d WHERE d.prediction_id = p.id)"
        " FROM predictions p WHERE p.shadow_model = %s AND p.model = %s ORDER BY p.id",
        (version_name(candidate), version_name(live)),
    ).fetchall()
    kept = [row for row in rows if not (row[5] and is_held_out(row[1], row[0]))]
    if not kept:
        return None
    labels = torch.tensor([row[2] for row in kept])
    live_right = torch.tensor([row[3] == row[2] for row in kept])
    candidate_right = torch.tensor([row[4] == row[2] for row in kept])
    by_digit = {
        digit: Paired.of(live_right[labels == digit], candidate_right[labels == digit])
        for digit in sorted(set(labels.tolist()))
    }
    return SetComparison(SHADOW, True, Paired.of(live_right, candidate_right), by_digit)


def refusals(comparisons: list[SetComparison]) -> list[str]:
    """The rule; why the candidate may not be promoted (empty: promote it).

    1. On people's drawings neither model trained on, the primary sets pooled (the held-out
       feedback, and the shadow answers: the candidate's own beside the live model's, where it
       ran in shadow), more drawings only the candidate reads right than drawings only the live
       model reads right; or as many (a few hundred drawings that both read almost all right
       often cannot tell two models apart), and a lower mean loss on the held-out feedback once
       each model's confidence is calibrated on the drawings neither trained on (`calibrate`):
       the candidate gives the people's true labels more probability, not merely surer answers,
       since a model surer than it is right is tempered first.
    2. On every set, overall: not worse beyond the noise, i.e. not more live-only than
       candidate-only drawings with a one-sided sign test p < GUARD_ALPHA; rule 1's sets too
       when it pools two (neither may hide a loss behind the other).
    3. On every set, each digit: likewise with p < PER_DIGIT_ALPHA.
    """
    reasons = []
    primary = [c for c in comparisons if c.primary]
    evidence = [c for c in primary if c.overall.count]  # rule 1's sets, pooled
    if not evidence:
        reasons.append(f"no {PRIMARY} to judge the candidate by")
    else:
        paired, first = sum((c.overall for c in evidence[1:]), evidence[0].overall), primary[0]
        likelier = (
            first.live_calibrated is not None
            and first.candidate_calibrated is not None
            and first.candidate_calibrated < first.live_calibrated
        )
        if paired.only_candidate < paired.only_live or (
            paired.only_candidate == paired.only_live and not likelier
        ):
            reasons.append(
                f"not better on {' and '.join(c.name for c in evidence)}:"
                f" {paired.only_candidate} drawings only the"
                f" candidate reads right, {paired.only_live} only the live model"
                + (
                    f"; calibrated mean loss {_loss(first.candidate_calibrated)} against"
                    f" {_loss(first.live_calibrated)}"
                    if paired.only_candidate == paired.only_live
                    else ""
                )
            )
    for comparison in comparisons:
        paired = comparison.overall
        guarded = not comparison.primary or len(evidence) > 1
        if guarded and (p := paired.p_worse()) < GUARD_ALPHA:
            reasons.append(
                f"worse on {comparison.name}: {paired.only_live} only the live model reads"
                f" right, {paired.only_candidate} only the candidate (p={p:.2g})"
            )
        for digit, paired in comparison.by_digit.items():
            if (p := paired.p_worse()) < PER_DIGIT_ALPHA:
                reasons.append(
                    f"worse on the {digit}s of {comparison.name}: {paired.only_live} only"
                    f" the live model reads right, {paired.only_candidate} only the"
                    f" candidate (p={p:.2g})"
                )
    return reasons


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def comparison_table(
    comparisons: list[SetComparison], live: str, candidate: str, reasons: list[str]
) -> str:
    lines = [
        f"candidate {candidate[:12]} against the live model {live[:12]}",
        f"{'set':<22}{'images':>8}{'live':>9}{'cand.':>9}{'only live':>11}{'only cand.':>12}"
        f"{'p worse':>9}{'p better':>10}{'loss live':>11}{'loss cand.':>11}",
    ]
    for c in comparisons:
        paired = c.overall
        lines.append(
            f"{c.name:<22}{paired.count:>8}{percent(paired.live, paired.count):>9}"
            f"{percent(paired.candidate, paired.count):>9}{paired.only_live:>11}"
            f"{paired.only_candidate:>12}{paired.p_worse():>9.3g}{paired.p_better():>10.3g}"
            f"{_loss(c.live_loss):>11}{_loss(c.candidate_loss):>11}"
        )
    for c in comparisons:
        if c.live_calibrated is not None:
            lines.append(
                f"{c.name}: mean loss once calibrated on the other sets, live"
                f" {_loss(c.live_calibrated)}, candidate {_loss(c.candidate_calibrated)}"
            )
    lines.append("per digit, accuracy live -> candidate (only live / only candidate):")
    for c in comparisons:
        lines.append(f"  {c.name}")
        for digit, paired in c.by_digit.items():
            lines.append(
                f"    {digit}: {percent(paired.live, paired.count):>8} ->"
                f" {percent(paired.candidate, paired.count):>8}  of {paired.count:>5}"
                f"  ({paired.only_live} / {paired.only_candidate})"
            )
    if reasons:
        lines.append("REFUSED: " + "; ".join(reasons) + ". Nothing changed.")
    else:
        lines.append(f"PROMOTED: {candidate[:12]} is the live model.")
    return "\n".join(lines)


@dataclass(frozen=True)
class PromotionResult:
    promoted: bool
    table: str
    candidate_sha256: str
    live_sha256: str  # the live model the candidate was compared with
    reasons: tuple[str, ...] = ()
    sets: tuple[dict[str, Any], ...] = ()  # each set's comparison (SetComparison.as_dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.promoted else EXIT_REFUSED


def promote(
    candidate_path: Path,
    info: dict,
    eval_sets: dict[str, EvalSet],
    *,
    conninfo: str | None = None,
    out: Path | None = None,
    initial: Path | None = None,
) -> PromotionResult:
    """Register the candidate's weights as a version, compare it with the live model on
    *eval_sets* and on its answers in shadow beside it (``shadow_comparison``), print the table,
    and make it live (and write it with model.json to *out*, default models/model.pth) only by
    the rule of ``refusals``. A refusal changes nothing but the registry's list of versions.
    With an empty registry, *initial* (default: *out*) is made the first live version. Raises
    ModelLoadError for unreadable weights, VersionError, db.DatabaseUnavailable."""
    out = Path(out) if out is not None else model_lib.DEFAULT_MODEL_PATH
    weights = Path(candidate_path).read_bytes()
    candidate = load_weights(weights, str(candidate_path))
    with connect(conninfo) as conn:
        live = ensure_live(conn, Path(initial) if initial is not None else out)
        candidate_sha = register(conn, weights, info)
        live_weights, _ = weights_of(conn, live)
        comparisons = compare(load_weights(live_weights, f"version {live}"), candidate, eval_sets)
        if (shadow := shadow_comparison(conn, live, candidate_sha)) is not None:
            comparisons.insert(sum(c.primary for c in comparisons), shadow)  # after PRIMARY
        reasons = refusals(comparisons)
        if candidate_sha == live:
            reasons = ["the candidate is the live model already"]
        report = {
            "compared_with": live,
            "sets": [c.as_dict() for c in comparisons],  # a list: jsonb would reorder keys
            "refused": reasons,
        }
        if not reasons:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROMOTION_LOCK_KEY,))
                if (now_live := live_sha(conn)) != live:
                    reasons = [f"the live model changed to {now_live[:12]} meanwhile: run again"]
                else:
                    record(conn, candidate_sha, "promote", report)
    table = comparison_table(comparisons, live, candidate_sha, reasons)
    print(table, flush=True)
    if reasons:
        log.warning("candidate %s refused: %s", candidate_sha[:12], "; ".join(reasons))
    else:
        write_model_files(weights, {**info, "sha256": candidate_sha}, out)
        log.info("candidate %s promoted; weights written to %s", candidate_sha[:12], out)
    sets = tuple(c.as_dict() for c in comparisons)
    return PromotionResult(not reasons, table, candidate_sha, live, tuple(reasons), sets)
