"""Model versions, promotion and rollback: which model the app serves, and why.

Every trained model is a *version*: its weights file's bytes, stored in PostgreSQL
(``model_versions``) under their SHA-256, with ``info`` (what train.py writes to model.json: the
data and settings it was trained with, its figures). Which version is *live* is the newest row of
``model_promotions`` (actions ``initial``, ``promote``, ``rollback``, each with its report).
Every app process, on any machine, reads the live version from there (``LiveModel``): no shared
filesystem, no restart. Everything here writes with the owner's credentials
(``db.resolve_conninfo(owner=True)``); the app's role may only read these tables.

``promote()`` (``train.py --promote``) compares a candidate with the live model on the same
evaluation sets, prints the table and promotes only by ``refusals()``'s rule (README, "Versions
and promotion").

    python versions.py list                  # every version: when it was live, its figures
    python versions.py rollback 3f2a9c       # make an earlier version live again (hash prefix)
    python versions.py export model.pth      # the live model's weights, to a file
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import torch
from psycopg import errors
from psycopg.types.json import Jsonb

import db
import files
import model as model_lib

log = logging.getLogger("versions")

EXIT_REFUSED = 3  # train.py --promote: the candidate was refused; nothing changed
EXIT_BAD_INPUT = 2  # versions.py: unknown or ambiguous version, unreadable file
PRIMARY = "held-out feedback"  # the set a candidate must be better on (EvalSet.paired_primary)
# The rule (README, "Versions and promotion"): one-sided exact sign tests on the drawings that
# exactly one of the two models reads right.
GUARD_ALPHA = 0.05  # a set's overall loss this unlikely under "equally good" refuses
PER_DIGIT_ALPHA = 0.005  # a digit's loss on a set, likewise (0.05 over 10 digits: Bonferroni)
MODEL_CHECK_S = 10.0  # an app process asks for the live version's hash at most this often
MODEL_NAME = "model.pth"  # predictions.model = f"{MODEL_NAME}@{sha256[:12]}", as for the file
_PROMOTION_LOCK_KEY = 0x4D4E495356  # serialises promotions and rollbacks


class VersionError(RuntimeError):
    """No such version, an ambiguous prefix, a registry that cannot be used; nothing changed."""


# --- weights -------------------------------------------------------------------------------


def sha256_of(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()


def version_name(sha256: str) -> str:
    """How stored answers name the version (``predictions.model``): as the app names its file."""
    return f"{MODEL_NAME}@{sha256[:12]}"


def load_weights(weights: bytes, what: str = "weights") -> model_lib.DigitCNN:
    """A DigitCNN in eval mode from a state_dict's file bytes; ModelLoadError if they are not."""
    return model_lib.load_weights(io.BytesIO(weights), what)


def write_model_files(weights: bytes, info: Mapping[str, Any], out: Path) -> None:
    """The weights to *out* and model.json beside it, each atomically (whole or unchanged)."""
    with files.atomic_file(out) as handle:
        handle.write(weights)
    text = json.dumps(dict(info), indent=2) + "\n"
    with files.atomic_file(out.with_suffix(".json")) as handle:
        handle.write(text.encode())


# --- the registry (owner's credentials) ----------------------------------------------------


def _connect(conninfo: str | None) -> psycopg.Connection:
    conninfo = conninfo or db.resolve_conninfo(owner=True)
    db.migrate(conninfo, app_role=None)  # the tables are current (grants: `db.py migrate`)
    try:
        conn = psycopg.connect(conninfo, connect_timeout=db.CONNECT_TIMEOUT_S, autocommit=True)
    except psycopg.OperationalError as exc:
        raise db.DatabaseUnavailable(f"database unreachable: {exc}") from exc
    return conn


def register(conn: psycopg.Connection, weights: bytes, info: Mapping[str, Any]) -> str:
    """Store *weights* as a version (once: the same bytes are the same version); its hash."""
    sha = sha256_of(weights)
    conn.execute(
        "INSERT INTO model_versions (sha256, weights, info) VALUES (%s, %s, %s)"
        " ON CONFLICT (sha256) DO NOTHING",
        (sha, weights, Jsonb(dict(info))),
    )
    return sha


def live_sha(conn: psycopg.Connection) -> str | None:
    row = conn.execute("SELECT sha256 FROM model_promotions ORDER BY id DESC LIMIT 1").fetchone()
    return row[0] if row else None


def weights_of(conn: psycopg.Connection, sha: str) -> tuple[bytes, dict]:
    row = conn.execute(
        "SELECT weights, info FROM model_versions WHERE sha256 = %s", (sha,)
    ).fetchone()
    if row is None:
        raise VersionError(f"no version {sha}")
    return bytes(row[0]), row[1]


def _record(conn: psycopg.Connection, sha: str, action: str, report: Mapping[str, Any]) -> None:
    conn.execute(
        "INSERT INTO model_promotions (sha256, action, report) VALUES (%s, %s, %s)",
        (sha, action, Jsonb(dict(report))),
    )


def ensure_live(conn: psycopg.Connection, initial: Path) -> str:
    """The live version's hash; when the registry is empty, the model file *initial* (the one
    the app serves then) is registered and made live first, with the model.json beside it."""
    if (sha := live_sha(conn)) is not None:
        return sha
    try:
        weights = initial.read_bytes()
    except OSError as exc:
        raise VersionError(
            f"the registry is empty and the first live model {initial} cannot be read ({exc})"
        ) from exc
    load_weights(weights, str(initial))
    try:
        info = json.loads(initial.with_suffix(".json").read_text())
    except (OSError, ValueError):
        info = {}
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PROMOTION_LOCK_KEY,))
        if (sha := live_sha(conn)) is not None:
            return sha  # another process got there first
        sha = register(conn, weights, info)
        _record(conn, sha, "initial", {"file": str(initial)})
    log.info("registry was empty: %s (%s) is the first live version", initial, sha[:12])
    return sha


def resolve(conn: psycopg.Connection, prefix: str) -> str:
    """The one version whose hash starts with *prefix* (at least 4 hex digits)."""
    prefix = prefix.strip().lower()
    if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
        raise VersionError(f"{prefix!r}: give at least 4 hex digits of a version's hash")
    rows = conn.execute(
        "SELECT sha256 FROM model_versions WHERE starts_with(sha256, %s) ORDER BY 1 LIMIT 5",
        (prefix,),
    ).fetchall()
    if not rows:
        raise VersionError(f"no version's hash starts with {prefix} (see `versions.py list`)")
    if len(rows) > 1:
        found = ", ".join(row[0][:12] for row in rows)
        raise VersionError(f"{prefix} is ambiguous: {found}; give more digits")
    return rows[0][0]


def rollback(
    prefix: str, *, conninfo: str | None = None, out: Path | None = model_lib.DEFAULT_MODEL_PATH
) -> str:
    """Make the version *prefix* live again (every app follows within ~MODEL_CHECK_S) and write
    its weights to *out* (None: no file); its hash. VersionError if there is no such version."""
    with _connect(conninfo) as conn:
        sha = resolve(conn, prefix)
        weights, info = weights_of(conn, sha)
        load_weights(weights, f"version {sha[:12]}")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PROMOTION_LOCK_KEY,))
            previous = live_sha(conn)
            if previous == sha:
                log.info("version %s is live already", sha[:12])
            else:
                _record(conn, sha, "rollback", {"previous": previous})
    if out is not None:
        write_model_files(weights, {**info, "sha256": sha}, out)
    log.info("version %s is live (was %s)", sha[:12], (previous or "none")[:12])
    return sha


def export(path: Path, *, conninfo: str | None = None) -> str:
    """Write the live model's weights (and model.json) to *path*; its hash."""
    with _connect(conninfo) as conn:
        sha = live_sha(conn)
        if sha is None:
            raise VersionError("the registry is empty: the live model is models/model.pth")
        weights, info = weights_of(conn, sha)
    write_model_files(weights, {**info, "sha256": sha}, path)
    return sha


def versions_table(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every version, newest first: sha256, created_at, info, and its periods as the live
    model (``live``: dicts with action, since, until (None: live now), report)."""
    versions = conn.execute(
        "SELECT sha256, created_at, info FROM model_versions ORDER BY created_at DESC, sha256"
    ).fetchall()
    promotions = conn.execute(
        "SELECT sha256, action, promoted_at, report FROM model_promotions ORDER BY id"
    ).fetchall()
    return _with_periods(versions, promotions)


def _with_periods(versions: list, promotions: list) -> list[dict[str, Any]]:
    periods: dict[str, list[dict]] = {}
    for index, (sha, action, since, report) in enumerate(promotions):
        until = promotions[index + 1][2] if index + 1 < len(promotions) else None
        entry = {"action": action, "since": since, "until": until, "report": report}
        periods.setdefault(sha, []).append(entry)
    return [
        {"sha256": sha, "created_at": created, "info": info, "live": periods.get(sha, [])}
        for sha, created, info in versions
    ]


def history(model_answers: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """For the History page, through the app's pool: every version that was ever live, the
    newest first, with its periods, figures and the answers it gave (from
    ``db.models_answering()``'s rows, matched on ``version_name``)."""
    with db.connection() as conn:
        versions = conn.execute(
            "SELECT v.sha256, v.created_at, v.info FROM model_versions v"
            " WHERE EXISTS (SELECT 1 FROM model_promotions p WHERE p.sha256 = v.sha256)"
        ).fetchall()
        promotions = conn.execute(
            "SELECT sha256, action, promoted_at, report FROM model_promotions ORDER BY id"
        ).fetchall()
    rows = _with_periods(versions, promotions)
    answers = {entry["model"]: entry for entry in model_answers or []}
    for row in rows:
        given = answers.get(version_name(row["sha256"]), {})
        row["answers"], row["correct"] = given.get("answers", 0), given.get("correct", 0)
    return sorted(rows, key=lambda row: row["live"][-1]["since"], reverse=True)


def history_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``history()``'s rows as History's table shows them: one row per version."""
    table = []
    for row in rows:
        info = row["info"] or {}
        periods = [
            f"{p['since']:%Y-%m-%d %H:%M} to {p['until']:%Y-%m-%d %H:%M}"
            if p["until"]
            else f"since {p['since']:%Y-%m-%d %H:%M} (live)"
            for p in row["live"]
        ]
        promoted = [p["report"] for p in row["live"] if p["action"] == "promote"]
        answers, correct = row["answers"], row["correct"]
        table.append(
            {
                "version": version_name(row["sha256"]),
                "accuracy of its answers": 100 * correct / answers if answers else None,
                "answers": answers,
                "live": "; ".join(reversed(periods)),
                "figures at promotion": _report_figures(promoted[-1]) if promoted else "-",
                "figures from training": _figures(info),
                "trained on": "+".join(info.get("sources") or []) or "-",
                "how": ", ".join(dict.fromkeys(p["action"] for p in row["live"])),
            }
        )
    return table


def _report_figures(report: Mapping[str, Any]) -> str:
    parts = []
    for figures in report.get("sets") or []:
        count = figures.get("count") or 0
        text = f"{figures.get('name')} {_percent(figures.get('candidate', 0), count)} of {count}"
        if figures.get("primary"):
            text += (
                f" (only it right: {figures.get('only_candidate')},"
                f" only the model before: {figures.get('only_live')})"
            )
        parts.append(text)
    return "; ".join(parts) or "-"


# --- comparing two models ------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    images: torch.Tensor  # (N, 1, 28, 28) float, normalised as utils.normalize does
    labels: torch.Tensor  # (N,) int64
    paired_primary: bool = False  # the held-out feedback: the candidate must be better on it
    # Their paths (N, 5, points) as utils.trajectory gives them, read by a model that has a
    # trajectory model as the app reads them; None: the images alone.
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


@dataclass(frozen=True)
class SetComparison:
    name: str
    primary: bool
    overall: Paired
    by_digit: dict[int, Paired] = field(default_factory=dict)
    live_loss: float | None = None  # mean cross-entropy of the true labels
    candidate_loss: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "primary": self.primary,
            **self.overall.as_dict(),
            "live_loss": self.live_loss,
            "candidate_loss": self.candidate_loss,
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
    """What `net` makes of each image (with its path, where given and `net` reads paths)."""
    net.eval()
    out = []
    reads_paths = trajectories is not None and getattr(net, "trajectory", None) is not None
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            inputs = [images[start : start + batch].float()]
            if reads_paths:
                inputs.append(trajectories[start : start + batch])
            out.append(torch.log_softmax(net(*inputs), dim=1))
    return torch.cat(out) if out else torch.empty((0, 10))


def compare(
    live: torch.nn.Module, candidate: torch.nn.Module, eval_sets: Mapping[str, EvalSet]
) -> list[SetComparison]:
    results = []
    for name, eval_set in eval_sets.items():
        labels = eval_set.labels.long()
        live_out = log_probabilities(live, eval_set.images, trajectories=eval_set.trajectories)
        candidate_out = log_probabilities(
            candidate, eval_set.images, trajectories=eval_set.trajectories
        )
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
        overall = Paired.of(live_right, candidate_right)
        results.append(SetComparison(name, eval_set.paired_primary, overall, by_digit, *losses))
    return results


def refusals(comparisons: list[SetComparison]) -> list[str]:
    """The rule; why the candidate may not be promoted (empty: promote it).

    1. On the held-out feedback (people's drawings never trained on), more drawings only the
       candidate reads right than drawings only the live model reads right; or as many, and a
       lower mean loss (cross-entropy of the true labels: surer of the right answers).
    2. On every set, overall: not worse beyond the noise, i.e. not more live-only than
       candidate-only drawings with a one-sided sign test p < GUARD_ALPHA.
    3. On every set, each digit: likewise with p < PER_DIGIT_ALPHA.
    """
    reasons = []
    primary = [c for c in comparisons if c.primary]
    if not primary or primary[0].overall.count == 0:
        reasons.append(f"no {PRIMARY} to judge the candidate by")
    else:
        paired, first = primary[0].overall, primary[0]
        surer = (
            first.live_loss is not None
            and first.candidate_loss is not None
            and first.candidate_loss < first.live_loss
        )
        if paired.only_candidate < paired.only_live or (
            paired.only_candidate == paired.only_live and not surer
        ):
            reasons.append(
                f"not better on {first.name}: {paired.only_candidate} drawings only the"
                f" candidate reads right, {paired.only_live} only the live model"
                + (
                    f"; mean loss {_loss(first.candidate_loss)} against {_loss(first.live_loss)}"
                    if paired.only_candidate == paired.only_live
                    else ""
                )
            )
    for comparison in comparisons:
        paired = comparison.overall
        if not comparison.primary and (p := paired.p_worse()) < GUARD_ALPHA:
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


def _percent(right: int, count: int) -> str:
    return f"{100 * right / count:.2f}%" if count else "-"


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
            f"{c.name:<22}{paired.count:>8}{_percent(paired.live, paired.count):>9}"
            f"{_percent(paired.candidate, paired.count):>9}{paired.only_live:>11}"
            f"{paired.only_candidate:>12}{paired.p_worse():>9.3g}{paired.p_better():>10.3g}"
            f"{_loss(c.live_loss):>11}{_loss(c.candidate_loss):>11}"
        )
    lines.append("per digit, accuracy live -> candidate (only live / only candidate):")
    for c in comparisons:
        lines.append(f"  {c.name}")
        for digit, paired in c.by_digit.items():
            lines.append(
                f"    {digit}: {_percent(paired.live, paired.count):>8} ->"
                f" {_percent(paired.candidate, paired.count):>8}  of {paired.count:>5}"
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
    *eval_sets*, print the table, and make it live (and write it with model.json to *out*,
    default models/model.pth) only by the rule of ``refusals``. A refusal changes nothing but
    the registry's list of versions. With an empty registry, *initial* (default: *out*) is made
    the first live version. Raises ModelLoadError for unreadable weights, VersionError,
    db.DatabaseUnavailable."""
    out = Path(out) if out is not None else model_lib.DEFAULT_MODEL_PATH
    weights = Path(candidate_path).read_bytes()
    candidate = load_weights(weights, str(candidate_path))
    with _connect(conninfo) as conn:
        live = ensure_live(conn, Path(initial) if initial is not None else out)
        candidate_sha = register(conn, weights, info)
        live_weights, _ = weights_of(conn, live)
        comparisons = compare(load_weights(live_weights, f"version {live}"), candidate, eval_sets)
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
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PROMOTION_LOCK_KEY,))
                if (now_live := live_sha(conn)) != live:
                    reasons = [f"the live model changed to {now_live[:12]} meanwhile: run again"]
                else:
                    _record(conn, candidate_sha, "promote", report)
    table = comparison_table(comparisons, live, candidate_sha, reasons)
    print(table, flush=True)
    if reasons:
        log.warning("candidate %s refused: %s", candidate_sha[:12], "; ".join(reasons))
    else:
        write_model_files(weights, {**info, "sha256": candidate_sha}, out)
        log.info("candidate %s promoted; weights written to %s", candidate_sha[:12], out)
    return PromotionResult(not reasons, table, candidate_sha, live, tuple(reasons))


# --- the live model in an app process ------------------------------------------------------


class LiveModel:
    """The model an app process serves, with its name for ``predictions.model``.

    The first ``get()`` looks up the live version, then starts a thread that looks again every
    *check_s* seconds (a one-row query with the app's pool), whether or not anyone draws; a new
    hash's weights are read once, checked against their hash, loaded, passed to *prepare*
    (warm-up: what it returns, if anything, is served instead), and served from the next
    ``get()`` on. ``get()`` itself never touches the
    database. While the database is down or the new weights are unusable, the current model
    stays (logged); with an empty (or not yet migrated) registry, ``load_file()`` serves
    models/model.pth as before versions existed. The thread ends once the LiveModel is gone.
    """

    def __init__(
        self,
        load_file: Callable[[], tuple[torch.nn.Module, str]],
        prepare: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None,
        check_s: float | None = None,
    ) -> None:
        self.load_file = load_file
        self.prepare = prepare
        self.check_s = MODEL_CHECK_S if check_s is None else check_s
        self._lock = threading.Lock()
        self._started = False
        self.closed = False  # close(): the thread stops
        self._served: tuple[torch.nn.Module, str] | None = None  # from the registry
        self._sha: str | None = None
        self._unusable: set[str] = set()  # hashes whose weights failed: not read again
        self._problem: str | None = None  # the last failure logged, to log each one once

    @property
    def sha256(self) -> str | None:
        return self._sha

    def get(self) -> tuple[torch.nn.Module, str]:
        if not self._started:
            with self._lock:
                if not self._started:
                    self._check()
                    threading.Thread(
                        target=_follow_live,
                        args=(weakref.ref(self), self.check_s),
                        name="live-model",
                        daemon=True,
                    ).start()
                    self._started = True
        served = self._served
        return served if served is not None else self.load_file()

    def close(self) -> None:
        """Stop looking for new versions (the thread ends at its next wake-up)."""
        self.closed = True

    def _check(self) -> None:
        try:
            self._follow()
        except Exception as exc:
            self._report(f"kept the model {self._current_name()}: {exc}", exc)
        else:
            self._problem = None

    def _current_name(self) -> str:
        return self._served[1] if self._served else "file " + str(model_lib.model_path())

    def _report(self, message: str, exc: Exception) -> None:
        if message != self._problem:
            expected = isinstance(exc, (db.DatabaseUnavailable, model_lib.ModelLoadError))
            if expected:
                log.warning(message)
            else:
                log.exception(message)
        self._problem = message

    def _follow(self) -> None:
        try:
            with db.connection() as conn:
                row = conn.execute(
                    "SELECT sha256 FROM model_promotions ORDER BY id DESC LIMIT 1"
                ).fetchone()
                sha = row[0] if row else None
                if sha is None or sha == self._sha or sha in self._unusable:
                    weights = None
                else:
                    found = conn.execute(
                        "SELECT weights FROM model_versions WHERE sha256 = %s", (sha,)
                    ).fetchone()
                    weights = bytes(found[0])
        except errors.UndefinedTable:
            sha = weights = None  # not migrated yet: no versions
        if sha is None:
            if self._served is not None:
                log.warning("the registry has no live version: serving the model file")
            self._served, self._sha = None, None
            return
        if weights is None:
            return
        name = version_name(sha)
        try:
            if sha256_of(weights) != sha:
                raise model_lib.ModelLoadError(f"version {name}: weights do not match their hash")
            net = load_weights(weights, f"version {name}")
            if self.prepare is not None and (prepared := self.prepare(net)) is not None:
                net = prepared
        except model_lib.ModelLoadError:
            self._unusable.add(sha)
            raise
        previous = self._current_name()
        self._served, self._sha = (net, name), sha
        log.info("now serving version %s (was %s)", name, previous)


def _follow_live(ref: weakref.ref[LiveModel], interval: float) -> None:
    """A LiveModel's thread: a check every *interval* seconds while the LiveModel exists."""
    while True:
        time.sleep(interval)
        if (live := ref()) is None or live.closed:
            return
        live._check()
        del live


# --- command line --------------------------------------------------------------------------


def _figures(info: Mapping[str, Any]) -> str:
    parts = []
    if (test := info.get("test_accuracy")) is not None:
        parts.append(f"MNIST test {test:.2%}")
    if (pen := (info.get("pen_held_out") or {}).get("accuracy")) is not None:
        parts.append(f"pen writers {pen:.2%}")
    for key, value in info.items():  # train.py's held-out feedback figure (its own key)
        if "feedback" in key and isinstance(value, dict) and "accuracy" in value:
            parts.append(f"held-out feedback {value['accuracy']:.2%} of {value.get('count', '?')}")
    return ", ".join(parts) or "no figures"


def _print_list(rows: list[dict[str, Any]], live: str | None) -> None:
    for row in rows:
        info = row["info"] or {}
        marker = "*" if row["sha256"] == live else " "
        print(f"{marker} {row['sha256'][:12]}  created {row['created_at']:%Y-%m-%d %H:%M:%S %Z}")
        sources = "+".join(info.get("sources") or []) or "unknown data"
        print(f"    {sources}: {_figures(info)}")
        for period in row["live"]:
            until = f"{period['until']:%Y-%m-%d %H:%M:%S}" if period["until"] else "now"
            print(f"    live ({period['action']}) {period['since']:%Y-%m-%d %H:%M:%S} to {until}")
        if not row["live"]:
            print("    never live")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every version, the live one marked *")
    back = commands.add_parser("rollback", help="make an earlier version live again")
    back.add_argument("version", help="the start of its hash (see list)")
    back.add_argument(
        "--out", type=Path, default=model_lib.DEFAULT_MODEL_PATH, help="also write it here"
    )
    out = commands.add_parser("export", help="write the live model's weights to a file")
    out.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            with _connect(None) as conn:
                rows, live = versions_table(conn), live_sha(conn)
            if not rows:
                print("no versions yet: the app serves models/model.pth")
            _print_list(rows, live)
        elif args.command == "rollback":
            sha = rollback(args.version, out=args.out)
            print(f"{sha[:12]} is live; its weights are in {args.out}")
        else:
            sha = export(args.path)
            print(f"wrote the live model {sha[:12]} to {args.path}")
    except (VersionError, model_lib.ModelLoadError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except db.DatabaseUnavailable as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
