"""The registry's storage: every model version and which one is live, in PostgreSQL.

Every trained model is a *version*: its weights file's bytes, stored in PostgreSQL
(``model_versions``) under their SHA-256, with ``info`` (what train.py writes to model.json: the
data and settings it was trained with, its figures). Which version is *live* is the newest row of
``model_promotions`` (actions ``initial``, ``promote``, ``rollback``, each with its report);
which one runs in *shadow* beside it (read every drawing, its answer stored, never shown), the
newest row of ``model_shadow``.
Every app process, on any machine, reads the live version from there (registry/live.py): no
shared filesystem, no restart. The registry writes only with the owner's credentials
(``connect``: ``db.resolve_conninfo(owner=True)``); the app's role may only read these tables,
as ``history()`` does for the History page.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

import db
import files
import model as model_lib

log = logging.getLogger("versions")  # the registry's logger, named after its command line

MODEL_NAME = "model.pth"  # predictions.model = f"{MODEL_NAME}@{sha256[:12]}", as for the file
PROMOTION_LOCK_KEY = 0x4D4E495356  # serialises promotions and rollbacks


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


def connect(conninfo: str | None) -> psycopg.Connection:
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


def shadow_sha(conn: psycopg.Connection) -> str | None:
    """The version in shadow (None: none), as the newest row of ``model_shadow`` says."""
    row = conn.execute("SELECT sha256 FROM model_shadow ORDER BY id DESC LIMIT 1").fetchone()
    return row[0] if row else None


def weights_of(conn: psycopg.Connection, sha: str) -> tuple[bytes, dict]:
    row = conn.execute(
        "SELECT weights, info FROM model_versions WHERE sha256 = %s", (sha,)
    ).fetchone()
    if row is None:
        raise VersionError(f"no version {sha}")
    return bytes(row[0]), row[1]


def record(conn: psycopg.Connection, sha: str, action: str, report: Mapping[str, Any]) -> None:
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
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROMOTION_LOCK_KEY,))
        if (sha := live_sha(conn)) is not None:
            return sha  # another process got there first
        sha = register(conn, weights, info)
        record(conn, sha, "initial", {"file": str(initial)})
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
    """Make the version *prefix* live again (every app follows within ~live.MODEL_CHECK_S) and
    write its weights to *out* (None: no file); its hash. VersionError if there is no such
    version."""
    with connect(conninfo) as conn:
        sha = resolve(conn, prefix)
        weights, info = weights_of(conn, sha)
        load_weights(weights, f"version {sha[:12]}")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROMOTION_LOCK_KEY,))
            previous = live_sha(conn)
            if previous == sha:
                log.info("version %s is live already", sha[:12])
            else:
                record(conn, sha, "rollback", {"previous": previous})
    if out is not None:
        write_model_files(weights, {**info, "sha256": sha}, out)
    log.info("version %s is live (was %s)", sha[:12], (previous or "none")[:12])
    return sha


def set_shadow(prefix: str | None, *, conninfo: str | None = None) -> str | None:
    """Run the version *prefix* in shadow beside the live model (None: no shadow): every app
    process reads each drawing with both within ~live.MODEL_CHECK_S, shows the live model's
    answer and stores the shadow's beside it. Its hash (None: off). VersionError if there is no
    such version or it is the live one; ModelLoadError if its weights do not load."""
    with connect(conninfo) as conn:
        sha = None
        if prefix is not None:
            sha = resolve(conn, prefix)
            weights, _ = weights_of(conn, sha)
            load_weights(weights, f"version {sha[:12]}")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROMOTION_LOCK_KEY,))
            if sha is not None and sha == live_sha(conn):
                raise VersionError(
                    f"{sha[:12]} is the live version: a shadow runs beside the live model, so"
                    " give another version (see `versions.py list`)"
                )
            previous = shadow_sha(conn)
            if previous != sha:
                conn.execute("INSERT INTO model_shadow (sha256) VALUES (%s)", (sha,))
    if sha is None:
        log.info("no shadow (was %s)", (previous or "none")[:12])
    else:
        log.info("version %s is in shadow (was %s)", sha[:12], (previous or "none")[:12])
    return sha


def export(path: Path, *, conninfo: str | None = None) -> str:
    """Write the live model's weights (and model.json) to *path*; its hash."""
    with connect(conninfo) as conn:
        sha = live_sha(conn)
        if sha is None:
            raise VersionError("the registry is empty: the live model is models/model.pth")
        weights, info = weights_of(conn, sha)
    write_model_files(weights, {**info, "sha256": sha}, path)
    return sha


# --- what `versions.py list` and the History page show -------------------------------------


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
                "figures from training": figures_text(info),
                "trained on": "+".join(info.get("sources") or []) or "-",
                "how": ", ".join(dict.fromkeys(p["action"] for p in row["live"])),
            }
        )
    return table


def _report_figures(report: Mapping[str, Any]) -> str:
    parts = []
    for figures in report.get("sets") or []:
        count = figures.get("count") or 0
        text = f"{figures.get('name')} {percent(figures.get('candidate', 0), count)} of {count}"
        if figures.get("primary"):
            text += (
                f" (only it right: {figures.get('only_candidate')},"
                f" only the model before: {figures.get('only_live')})"
            )
        parts.append(text)
    return "; ".join(parts) or "-"


def figures_text(info: Mapping[str, Any]) -> str:
    parts = []
    if (test := info.get("test_accuracy")) is not None:
        parts.append(f"MNIST test {test:.2%}")
    if (pen := (info.get("pen_held_out") or {}).get("accuracy")) is not None:
        parts.append(f"pen writers {pen:.2%}")
    for key, value in info.items():  # train.py's held-out feedback figure (its own key)
        if "feedback" in key and isinstance(value, dict) and "accuracy" in value:
            parts.append(f"held-out feedback {value['accuracy']:.2%} of {value.get('count', '?')}")
    return ", ".join(parts) or "no figures"


def percent(right: int, count: int) -> str:
    return f"{100 * right / count:.2f}%" if count else "-"
