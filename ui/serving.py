"""What every session of the app shares, once per process: the model (st.cache_resource, followed
live from the registry) and the database (its status, and the one place an answer is stored).

Imported by the pages, never run as a page: its cached functions and the status stay the same
objects over every run of every session.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
import torch
from psycopg.conninfo import conninfo_to_dict

import db
import feedback
import model
import registry.live
import settings
import utils

logger = logging.getLogger("app")


# --- model ---------------------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def load_classifier(path: str, file_version: tuple[int, int] | None) -> model.Compiled:
    """The model at *path*, loaded once per process and file version (reloaded after retraining)."""
    start = time.perf_counter()
    classifier = warm_up(model.load_model(path))
    logger.info("loaded model %s in %.0f ms", path, (time.perf_counter() - start) * 1000)
    return classifier


def warm_up(classifier: model.DigitCNN) -> model.Compiled:
    """Ready a freshly loaded model for predictions, from a file or the registry: compiled
    (`model.Compiled`, ~1.4 ms less per drawing) and run once."""
    # One small image at a time: more threads only add synchronisation, which costs up to
    # ~150 ms per prediction when the CPU is shared (measured on 2 cores). APP_THREADS: more.
    torch.set_num_threads(settings.app_threads())
    classifier = model.Compiled(classifier)
    # The first forward pass is ~200 ms slower than the next ones: pay it here, not on a drawing.
    for _ in range(2):  # TorchScript settles its graph on its first runs
        model.predict(
            classifier,
            utils.normalize(np.zeros((28, 28), dtype=np.uint8))[None, None],
            utils.trajectory([[[0, 0], [10, 10]]]),
        )
    return classifier


@st.cache_resource(show_spinner=False, max_entries=2)
def stored_model_name(path: str, file_version: tuple[int, int] | None) -> str:
    """How stored answers name the model: its file name and the start of its SHA-256."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return f"{Path(path).name}@{digest[:12]}"


@st.cache_resource(show_spinner=False)
def live_model() -> registry.live.LiveModel:
    """The registry's live version, followed within ~10 s of a promotion (registry/live.py); the
    model file while the registry is empty."""
    return registry.live.LiveModel(file_classifier, prepare=warm_up)


def current_classifier() -> tuple[model.Compiled, str]:
    """The model and its name, taken together (the name stored is the model's that predicted);
    raises model.ModelLoadError, saying how to train a model, if there is none."""
    return live_model().get()


def shadow_classifier() -> tuple[model.Compiled, str] | None:
    """The shadow model and its name (``versions.py shadow``), None without one: what reads each
    drawing beside the live model, never shown."""
    return live_model().shadow()


def file_classifier() -> tuple[model.Compiled, str]:
    """The model file (MODEL_PATH) and its name, reloaded when the file changes."""
    path = model.model_path()
    try:
        stat = path.stat()
        file_version = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        file_version = None  # load_model explains what is missing; errors are not cached
    classifier = load_classifier(str(path), file_version)
    return classifier, stored_model_name(str(path), file_version)


# --- database ------------------------------------------------------------------------------


@dataclass
class DatabaseStatus:
    """Shared by all sessions: whether the database was reachable at the last attempt."""

    ready: bool = False


@st.cache_resource(show_spinner=False)
def database_status() -> DatabaseStatus:
    """Initialises the database once per process, at startup.

    If it is unreachable then, the app still predicts; the next feedback retries.
    """
    status = DatabaseStatus()
    try:
        connect_database(status)
    except db.DatabaseUnavailable as exc:
        logger.warning("starting without a database: %s", exc)
    except Exception:
        logger.exception("starting without a database: it could not be initialised")
    return status


def connect_database(status: DatabaseStatus) -> None:
    """Create the table if needed and log which database is used; raises DatabaseUnavailable."""
    db.init_db()
    db.check_connection_budget()  # RuntimeError if the replicas' pools exceed max_connections
    status.ready = True
    logger.info("using PostgreSQL %s", database_location())


def database_location() -> str:
    """user@host:port/dbname of the database in use (never the password)."""
    params = conninfo_to_dict(db.get_pool().conninfo)
    user, dbname = params.get("user", ""), params.get("dbname", "")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{user}@{host}:{params.get('port') or 5432}/{dbname}"


def store(
    submission: feedback.Submission,
    model_name: str | None = None,
    drawing: db.Drawing | None = None,
    shadow: tuple[str, model.Prediction] | None = None,
) -> int:
    """Store one answer (once, whatever the retries), with its drawing and what the shadow
    model (named) made of it, if given; raises db.DatabaseUnavailable."""
    status = database_status()
    shadow_name, shadow_read = shadow or (None, None)
    start = time.perf_counter()
    try:
        if not status.ready:
            connect_database(status)
        row_id = db.log_prediction(
            submission.predicted_digit,
            submission.true_label,
            submission.confidence,
            submission_id=submission.submission_id,
            model=model_name,
            drawing=drawing,
            shadow_model=shadow_name,
            shadow_digit=None if shadow_read is None else shadow_read.digit,
            shadow_confidence=None if shadow_read is None else shadow_read.confidence,
        )
    except db.DatabaseBusy:
        raise
    except db.DatabaseUnavailable:
        status.ready = False
        raise
    logger.info(
        "stored feedback id=%d (predicted %d, true label %d) in %.1f ms",
        row_id,
        submission.predicted_digit,
        submission.true_label,
        (time.perf_counter() - start) * 1000,
    )
    return row_id
