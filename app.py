"""MNIST Digit Classifier: draw a digit, see what the model makes of it, confirm or correct it.

Run with ``streamlit run app.py``. Two pages: Draw (the default) and History.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
import torch
from PIL import Image
from psycopg.conninfo import conninfo_to_dict
from streamlit.errors import StreamlitAPIException

import db
import drawings
import feedback
import model
import registry.live
import registry.store
import utils
from utils import BRUSH_WIDTH, CANVAS_SIZE

if TYPE_CHECKING:
    from streamlit_drawable_canvas import CanvasResult

logger = logging.getLogger("app")

MODEL_VIEW_SIZE = 140  # the 28x28 model input, shown 5x larger
MAX_DRAWING_SIDE = 4 * CANVAS_SIZE  # room for high-DPI screens, far below a memory hog
# The canvas's PNG data URL, checked before it is decoded: a drawing is tens of kB, a 4x screen's
# noisiest a few MB. Streamlit refuses any message over server.maxMessageSize (.streamlit).
MAX_DRAWING_URL_CHARS = 4_000_000
HISTORY_LIMIT = 1_000  # newest answers listed on the History page (the CSV has them all)
ANSWERS_PER_POINT = 50  # History's accuracy over time: one point per so many answers
MAX_DOTS = 200  # ... drawn as dots on the line up to so many points
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# session_state keys
CANVAS_GENERATION = "canvas_generation"  # int; the canvas key is f"canvas-{n}", bumped to clear it
ANALYSIS = "analysis"  # Analysis of the last drawing seen, reused while the drawing is unchanged
PENDING_SUBMISSION = "pending_submission"  # feedback.Submission not stored yet, kept for a retry
SAVE_REQUEST = "save_request"  # (Analysis, true label) of a click, saved below the feedback row
FEEDBACK_ERROR = "feedback_error"  # str shown under the feedback row
SAVED_MESSAGE = "saved_message"  # str shown after a stored answer, until the next drawing

# widget keys: f"{name}-{drawing digest}" (see feedback_key)
TRUE_LABEL_INPUT = "true_label"
CORRECT_BUTTON = "correct"
SUBMIT_CORRECTION_BUTTON = "submit_correction"
MODEL_FILTER = "history_model"
TIME_SCALE = "history_time_scale"
PER_ANSWERS = f"per {ANSWERS_PER_POINT} answers"
PER_DAY = "per day"

INSTRUCTIONS = (
    "Draw a digit (0-9) in the black square. Is the guess right? Press **Correct**. "
    "If not, type the digit you drew and press **Submit correction**."
)
NOTHING_DRAWN = "Nothing drawn yet: the guess appears here."
DATABASE_DOWN_BANNER = (
    "Database unreachable: predictions work, but feedback cannot be saved until it is back."
)
FEEDBACK_NOT_SAVED = (
    "Feedback not saved: database unreachable. Your drawing and label are kept: "
    "try again in a moment."
)
FEEDBACK_BUSY = (
    "Feedback not saved: the database is busy. Your drawing and label are kept: "
    "try again in a moment."
)
FEEDBACK_FAILED = "Feedback not saved: unexpected error (details in the server log)."
SAVING = "Saving your answer..."
DRAWING_TOO_LARGE = "The drawing is too large to read: clear the canvas and draw again."
DRAWINGS_KEPT = "Your drawings are kept to improve the model."
DRAWING_TOO_LARGE_TO_KEEP = (
    "Not saved: this drawing is too large to keep ({}). Clear the canvas and draw the digit "
    "with fewer, shorter strokes."
)
# The app's role may only insert drawings, never read them: they are exported by the owner.
DRAWINGS_EXPORT = (
    "The drawings behind the answers are not in the CSV: export them with "
    "`python db.py export-drawings drawings.jsonl` (database owner; README, *The drawings*)."
)
DRAWING_UNREADABLE = "Not saved: the drawing could not be read. Clear the canvas and draw again."
HISTORY_BUSY = "History unavailable: the database is busy. Try again in a moment."
HISTORY_UNAVAILABLE = "History unavailable: database unreachable. Try again in a moment."
HISTORY_FAILED = "History unavailable: unexpected database error (details in the server log)."
NO_HISTORY = "No feedback stored yet: draw a digit, then press Correct or Submit correction."
UNRECORDED_MODEL = "not recorded"  # how History names the model of rows stored before it was

# Phones (Streamlit stacks columns below 640 px): less room above the title, a smaller title,
# so that the canvas, the guess and the feedback row fit on one screen.
PHONE_CSS = """
<style>
@media (max-width: 640px) {
  [data-testid="stMainBlockContainer"] { padding-top: 3.25rem; padding-bottom: 3rem; }
  h1 { font-size: 1.75rem !important; padding: 0 !important; }
  .st-key-drawings_notice p { line-height: 1.25; }
}
</style>
"""


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
    torch.set_num_threads(app_threads())
    classifier = model.Compiled(classifier)
    # The first forward pass is ~200 ms slower than the next ones: pay it here, not on a drawing.
    for _ in range(2):  # TorchScript settles its graph on its first runs
        model.predict(
            classifier,
            utils.normalize(np.zeros((28, 28), dtype=np.uint8))[None, None],
            utils.trajectory([[[0, 0], [10, 10]]]),
        )
    return classifier


def app_threads() -> int:
    """Torch threads for predictions: APP_THREADS (default 1)."""
    value = os.environ.get("APP_THREADS", "").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        logger.warning("APP_THREADS=%r is not a positive integer: using 1 thread", value)
        return 1
    return int(value)


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


@dataclass(frozen=True)
class Analysis:
    """What the app made of one drawing: a prediction, or a hint saying why there is none."""

    drawing_digest: str
    prediction: model.Prediction | None = None
    model_view_png: bytes | None = None
    hint: str | None = None
    model_name: str | None = None  # the model that made the prediction
    model_pixels: bytes | None = None  # the 28x28 uint8 image the model read
    # The strokes of this drawing, read once from the canvas's fabric.js objects
    # (drawings.canvas_strokes): for the prediction, and kept with an answer when one is saved;
    # or why they could not be read (the answer's drawing is refused with it).
    strokes: list | None = field(default=None, compare=False, repr=False)
    strokes_error: ValueError | None = field(default=None, compare=False, repr=False)


def drawing_digest(png: bytes) -> str:
    return hashlib.blake2b(png, digest_size=16).hexdigest()


def analyse(
    png: bytes,
    digest: str,
    classifier: model.Compiled,
    model_name: str | None = None,
    canvas_objects: list | None = None,
) -> Analysis:
    start = time.perf_counter()
    try:
        batch = utils.preprocess(decode_drawing(png))
    except utils.EmptyImageError as exc:
        return Analysis(digest, hint=str(exc))
    except (utils.ImageFormatError, OSError, Image.DecompressionBombError) as exc:
        logger.warning("unreadable drawing: %s", exc)
        return Analysis(digest, hint="The drawing could not be read: clear the canvas and retry.")
    strokes, strokes_error = read_strokes(canvas_objects)
    path = stroke_path(strokes, strokes_error)
    prepared = time.perf_counter()
    prediction = model.predict(classifier, batch, path)
    done = time.perf_counter()
    logger.info(
        "predicted %d (%.1f%%%s) in %.1f ms (preprocess %.1f ms, model %.1f ms)",
        prediction.digit,
        prediction.confidence * 100,
        "" if path is not None else ", from the image alone",
        (done - start) * 1000,
        (prepared - start) * 1000,
        (done - prepared) * 1000,
    )
    pixels = utils.to_pixels(batch)
    return Analysis(
        digest,
        prediction,
        model_view_png(pixels),
        model_name=model_name,
        model_pixels=pixels.tobytes(),
        strokes=strokes,
        strokes_error=strokes_error,
    )


def read_strokes(canvas_objects: list | None) -> tuple[list | None, ValueError | None]:
    """The strokes of the canvas's fabric.js objects (`drawings.canvas_strokes`), or why they
    cannot be read (db.DrawingTooLarge, drawings.UnreadableDrawing)."""
    try:
        return drawings.canvas_strokes(canvas_objects or []), None
    except ValueError as exc:
        return None, exc


def stroke_path(strokes: list | None, error: ValueError | None) -> torch.Tensor | None:
    """The drawing's path for the model of the strokes (`utils.trajectory`); None where the
    strokes could not be read (`error` says why): the image alone then decides, as it did
    before the model read strokes."""
    try:
        if strokes is None:
            raise error or drawings.UnreadableDrawing("no strokes")
        return utils.trajectory(strokes)
    except ValueError as exc:  # that, and utils' errors
        logger.warning("strokes unreadable, predicting from the image alone: %s", exc)
        return None


def decode_drawing(png: bytes) -> np.ndarray:
    """The canvas PNG as an array; anything far larger than the canvas is refused before
    decoding (a client could send a tiny PNG that claims to be gigapixels)."""
    image = Image.open(io.BytesIO(png))
    if max(image.size) > MAX_DRAWING_SIDE:
        raise utils.ImageFormatError(f"A drawing of {image.size} pixels is too large.")
    return np.asarray(image)


def model_view_png(pixels: np.ndarray) -> bytes:
    """The 28x28 input as a PNG upscaled with nearest neighbour, so every pixel stays crisp."""
    image = Image.fromarray(pixels).resize((MODEL_VIEW_SIZE, MODEL_VIEW_SIZE), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def current_analysis(
    canvas: CanvasResult, classifier: model.Compiled, model_name: str
) -> Analysis | None:
    """The analysis of the drawing on the canvas; None while nothing is drawn.

    Computed once per drawing: reruns that leave the drawing unchanged reuse it.
    """
    state = st.session_state
    if not (canvas.json_data or {}).get("objects"):
        state.pop(ANALYSIS, None)
        return None
    # The component's value, before CanvasResult base64-decodes it.
    data_url = ((state.get(canvas_key()) or {}).get("drawing") or {}).get("data") or ""
    if len(data_url) > MAX_DRAWING_URL_CHARS:
        logger.warning("refused a drawing of %d characters", len(data_url))
        analysis = Analysis(f"too-large-{len(data_url)}", hint=DRAWING_TOO_LARGE)
    else:
        png = canvas.image_bytes
        if not png:
            return None
        digest = drawing_digest(png)
        cached = state.get(ANALYSIS)
        if cached is not None and cached.drawing_digest == digest:
            return cached
        analysis = analyse(png, digest, classifier, model_name, canvas.json_data["objects"])
    state[ANALYSIS] = analysis
    # Messages about the previous drawing no longer apply.
    state.pop(FEEDBACK_ERROR, None)
    state.pop(SAVED_MESSAGE, None)
    return analysis


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


def store_drawings() -> bool:
    """Whether each answer's drawing is kept: STORE_DRAWINGS (default on; false/0/no/off)."""
    return _store_drawings(os.environ.get("STORE_DRAWINGS", ""))


@functools.cache  # read on every run: an unknown value is logged once
def _store_drawings(value: str) -> bool:
    value = value.strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    logger.warning("STORE_DRAWINGS=%r is not true or false: drawings are kept", value)
    return True


def store(
    submission: feedback.Submission,
    model_name: str | None = None,
    drawing: db.Drawing | None = None,
) -> int:
    """Store one answer (once, whatever the retries), with its drawing if given; raises
    db.DatabaseUnavailable."""
    status = database_status()
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


# --- feedback: callbacks (run before the rerun they trigger), then the save ----------------------


def feedback_key(name: str, analysis: Analysis | None) -> str:
    """The key of a feedback widget for the drawing on screen. A click that reaches the server
    after a newer drawing was analysed belongs to a widget of the old drawing, whose callback
    holds the analysis shown with it: the answer stored is always the one on screen."""
    return f"{name}-{analysis.drawing_digest if analysis else 'none'}"


def confirm_prediction(analysis: Analysis) -> None:
    """The Correct button: the model was right."""
    st.session_state[SAVE_REQUEST] = (analysis, analysis.prediction.digit)


def submit_correction(analysis: Analysis) -> None:
    """The Submit correction button: the typed label is the true one."""
    text = st.session_state.get(feedback_key(TRUE_LABEL_INPUT, analysis))
    try:
        true_label = feedback.parse_true_label(text)
    except feedback.InvalidLabel as exc:
        st.session_state[FEEDBACK_ERROR] = str(exc)
        return
    st.session_state[SAVE_REQUEST] = (analysis, true_label)


def save_requested_feedback(analysis: Analysis | None) -> None:
    """Save the answer just given, if any, showing that it is being saved, then the error if
    it failed. Below the feedback row: an element above the canvas would re-create it."""
    state = st.session_state
    if (request := state.pop(SAVE_REQUEST, None)) is not None:
        state.pop(FEEDBACK_ERROR, None)
        notice = st.empty()  # shown at once (st.spinner waits half a second)
        notice.info(SAVING, icon=":material/hourglass_top:")
        saved = save_feedback(*request)
        notice.empty()
        if saved:
            rerun_drawing_area()  # the canvas is already on the page: clear it in a new run
    if analysis is not None and analysis.prediction is not None and FEEDBACK_ERROR in state:
        st.error(state[FEEDBACK_ERROR])


def rerun_drawing_area() -> NoReturn:
    """Rerun the drawing area alone; the whole page when it is part of a full run (a fragment
    cannot rerun itself then)."""
    try:
        st.rerun(scope="fragment")
    except StreamlitAPIException:
        st.rerun()


def save_feedback(analysis: Analysis, true_label: int) -> bool:
    state = st.session_state
    prediction = analysis.prediction
    submission = feedback.submission_for(
        state.get(PENDING_SUBMISSION),
        analysis.drawing_digest,
        prediction.digit,
        prediction.confidence,
        true_label,
    )
    state[PENDING_SUBMISSION] = submission
    try:
        drawing = drawing_to_keep(analysis)
    except db.DrawingTooLarge as exc:
        logger.warning(
            "feedback %s not saved: drawing too large: %s", submission.submission_id, exc
        )
        state[FEEDBACK_ERROR] = DRAWING_TOO_LARGE_TO_KEEP.format(exc)
        return False
    except drawings.UnreadableDrawing as exc:
        logger.warning(
            "feedback %s not saved: drawing unreadable: %s", submission.submission_id, exc
        )
        state[FEEDBACK_ERROR] = DRAWING_UNREADABLE
        return False
    try:
        store(submission, analysis.model_name, drawing)
    except db.DatabaseBusy as exc:
        logger.warning("feedback %s not saved: %s", submission.submission_id, exc)
        state[FEEDBACK_ERROR] = FEEDBACK_BUSY
        return False
    except db.DatabaseUnavailable as exc:
        logger.warning("feedback %s not saved: %s", submission.submission_id, exc)
        state[FEEDBACK_ERROR] = FEEDBACK_NOT_SAVED
        return False
    except Exception:
        logger.exception("feedback %s not saved", submission.submission_id)
        state[FEEDBACK_ERROR] = FEEDBACK_FAILED
        return False
    state[SAVED_MESSAGE] = saved_message(submission)
    start_new_drawing()
    return True


def drawing_to_keep(analysis: Analysis) -> db.Drawing | None:
    """The drawing of the answer, as shown (the strokes travel with the analysis of the drawing
    on screen), or None with STORE_DRAWINGS off; raises why its strokes could not be read.
    Checked here, once per save, never per rerun."""
    if not store_drawings():
        return None
    if analysis.strokes_error is not None:
        raise analysis.strokes_error
    start = time.process_time()
    drawing = drawings.as_drawing(
        analysis.strokes or [], CANVAS_SIZE, BRUSH_WIDTH, analysis.model_pixels or b""
    )
    logger.info(
        "drawing of %d strokes, %d points checked in %.2f ms CPU",
        len(drawing.strokes),
        sum(len(stroke) for stroke in drawing.strokes),
        (time.process_time() - start) * 1000,
    )
    return drawing


def saved_message(submission: feedback.Submission) -> str:
    return (
        f"Saved: you drew a {submission.true_label} "
        f"(model said {submission.predicted_digit}, {submission.confidence:.1%})."
    )


def start_new_drawing() -> None:
    """Clear the canvas (a new key), the prediction and the inputs."""
    state = st.session_state
    state[CANVAS_GENERATION] += 1
    for key in (ANALYSIS, PENDING_SUBMISSION, FEEDBACK_ERROR):
        state.pop(key, None)


# --- pages ---------------------------------------------------------------------------------


def draw_page() -> None:
    st.title("MNIST Digit Classifier")
    st.markdown(INSTRUCTIONS)
    drawing_area()
    rerun_after_reconnect()


# A page that reconnects after its server went away asks for a full run only if its last run was
# a fragment's (after Correct) or it shows a fragment that reruns by itself; else it takes the
# server to have kept its session. A new app process (a replica that replaced a killed or updated
# one) has not: its new, empty session drops every rerun of the drawing area (a fragment it never
# ran), so the canvas answered nothing until the page was reloaded. This empty fragment reruns by
# itself once a day (costing nothing), so that a reconnected page always reruns in full.
@st.fragment(run_every=dt.timedelta(days=1))
def rerun_after_reconnect() -> None:
    pass


@st.fragment
def drawing_area() -> None:
    """The canvas and everything that changes with a drawing or an answer: a fragment, so that
    a drawing or a click reruns only this part of the page (the title, the navigation and the
    module itself are not rerun)."""
    try:
        classifier, name = current_classifier()
    except model.ModelLoadError as exc:
        show_model_missing(exc)
        return
    # Room for the canvas toolbar, which floats above it on hover: the notice that drawings are
    # kept, if they are (there, it costs no height a phone needs for the feedback row), else a
    # space. The same on every run: an element changing above the canvas would re-create it.
    if store_drawings():
        st.container(key="drawings_notice").caption(DRAWINGS_KEPT)
    else:
        st.space("small")
    # The canvas beside the result; a phone stacks them: canvas, guess and feedback row on one
    # screen, then the probabilities and the model's view below.
    canvas_column, result_column = st.columns([3, 4], gap="medium")
    with canvas_column:
        canvas = draw_canvas()
    analysis = current_analysis(canvas, classifier, name)
    with result_column:
        show_prediction(analysis)
        show_feedback_row(analysis)
        save_requested_feedback(analysis)
        show_details(analysis)
    # Below the canvas, never above it: an element appearing or vanishing before the canvas
    # would make Streamlit re-create the canvas, wiping the drawing in progress.
    if not database_status().ready:
        st.warning(DATABASE_DOWN_BANNER)
    if message := st.session_state.get(SAVED_MESSAGE):
        st.success(message)


def show_model_missing(error: model.ModelLoadError) -> None:
    st.error(str(error))
    st.markdown("Train a model (a few minutes on a CPU), then reload this page:")
    st.code(model.TRAIN_COMMAND, language="bash")


def draw_canvas() -> CanvasResult:
    # Imported here: the component registers itself on import, which needs a Streamlit runtime
    # (tests import this module without one).
    from streamlit_drawable_canvas import st_canvas

    return st_canvas(
        stroke_width=BRUSH_WIDTH,
        stroke_color="#FFFFFF",
        background_color="#000000",
        update_streamlit=True,
        height=CANVAS_SIZE,
        width=CANVAS_SIZE,
        drawing_mode="freedraw",
        return_image_data=True,
        key=canvas_key(),
    )


def canvas_key() -> str:
    return f"canvas-{st.session_state[CANVAS_GENERATION]}"


def show_prediction(analysis: Analysis | None) -> None:
    if analysis is None or analysis.prediction is None:
        st.info(analysis.hint if analysis else NOTHING_DRAWN)
        return
    prediction = analysis.prediction
    with st.container(horizontal=True, vertical_alignment="center", gap="medium"):
        st.subheader(f"Prediction: {prediction.digit}", anchor=False, width="content")
        st.markdown(f"**Confidence: {prediction.confidence:.1%}**", width="content")


def show_details(analysis: Analysis | None) -> None:
    """The probabilities of the ten digits and the 28x28 image the model saw."""
    if analysis is None or analysis.prediction is None:
        return
    prediction = analysis.prediction
    st.html(probability_bars(prediction))
    st.image(
        analysis.model_view_png,
        caption="What the model sees (28x28)",
        width=MODEL_VIEW_SIZE,
        output_format="PNG",  # "auto" would pick a lossy JPEG for an image without alpha
    )


BAR_COLOUR = "#4c78a8"  # Vega's default blue, as the chart this replaced
BAR_MAX_PX = 90  # a probability of 1


def probability_bars(prediction: model.Prediction) -> str:
    """The ten digits' probabilities as a bar chart in plain HTML (inline styles: st.html
    sanitises what it shows), each bar's value in its tooltip and in the label read aloud.
    A Vega-Lite chart did the same at twice the browser's CPU per prediction: with 16 people
    drawing on one machine, the browsers set the pace, not the app (README, Per-core capacity)."""
    bars, spoken = [], []
    for digit, probability in enumerate(prediction.probabilities):
        percent = f"{probability:.1%}"
        spoken.append(f"{digit}: {percent}")
        label = percent if probability >= 0.05 else "&nbsp;"
        bars.append(
            f'<div title="{digit}: {percent}" style="flex:1;display:flex;flex-direction:column;'
            f'justify-content:flex-end;align-items:center">'
            f'<div style="font-size:0.7rem;opacity:0.8">{label}</div>'
            f'<div style="width:70%;height:{probability * BAR_MAX_PX:.1f}px;min-height:1px;'
            f'background:{BAR_COLOUR};border-radius:2px 2px 0 0"></div>'
            f'<div style="font-size:0.8rem">{digit}</div></div>'
        )
    return (
        f'<div role="img" aria-label="Probabilities, {"; ".join(spoken)}" '
        f'style="display:flex;align-items:flex-end;gap:2px">{"".join(bars)}</div>'
    )


def show_feedback_row(analysis: Analysis | None) -> None:
    has_prediction = analysis is not None and analysis.prediction is not None
    # One row, left to right, even on a phone (a horizontal container does not stack).
    row = st.container(horizontal=True, vertical_alignment="bottom", gap="xsmall")
    row.button(
        "Correct",
        key=feedback_key(CORRECT_BUTTON, analysis),
        on_click=confirm_prediction,
        args=(analysis,),
        disabled=not has_prediction,
        type="primary",
    )
    row.text_input(
        "True label",
        key=feedback_key(TRUE_LABEL_INPUT, analysis),
        placeholder="0-9",
        max_chars=feedback.MAX_LABEL_CHARS,
        disabled=not has_prediction,
        width=76,
    )
    row.button(
        "Submit correction",
        key=feedback_key(SUBMIT_CORRECTION_BUTTON, analysis),
        on_click=submit_correction,
        args=(analysis,),
        disabled=not has_prediction,
        width="stretch",
    )


def history_page() -> None:
    st.title("History")
    try:
        show_versions(show_history())
    except db.DatabaseBusy as exc:  # healthy but slow: not an outage
        logger.warning("history unavailable: %s", exc)
        st.error(HISTORY_BUSY)
        return
    except db.DatabaseUnavailable as exc:
        database_status().ready = False
        logger.warning("history unavailable: %s", exc)
        st.error(HISTORY_UNAVAILABLE)
        return
    except Exception:
        logger.exception("history unavailable")
        st.error(HISTORY_FAILED)
        return
    database_status().ready = True


def show_history() -> list[dict]:
    """Every figure is counted by the database (db.py), never by loading all the rows. Returns
    the models that answered (db.models_answering), which the versions table reuses."""
    models = db.models_answering()
    if not models:
        st.info(NO_HISTORY)
        return models
    chosen = choose_model(models)
    shown = [entry for entry in models if chosen is None or entry["model"] == chosen]
    answers = sum(entry["answers"] for entry in shown)
    correct = sum(entry["correct"] for entry in shown)
    answers_column, accuracy_column = st.columns(2, wrap=False)
    answers_column.metric("Answers stored", f"{answers:,}")
    accuracy_column.metric("Model accuracy", f"{correct / answers:.1%}")
    st.caption(f"The model was right on {correct:,} of {plural(answers, 'answer')}.")

    st.subheader("What you drew, what the model said", anchor=False)
    digits = db.digit_accuracy(chosen)
    matrix_column, digits_column = st.columns([3, 2], gap="medium")
    with matrix_column:
        st.altair_chart(confusion_chart(db.confusion_counts(chosen)), height=340, width="stretch")
    with digits_column:
        st.dataframe(
            digit_table(digits),
            hide_index=True,
            column_config={
                "accuracy": st.column_config.ProgressColumn(
                    format="%.1f%%", min_value=0, max_value=100, color="green"
                )
            },
        )
    st.markdown(confusions_text(db.most_confused(chosen), digits))

    st.subheader("Accuracy over time", anchor=False)
    show_accuracy_over_time(chosen)

    st.subheader("Newest answers", anchor=False)
    rows = db.recent_predictions(limit=HISTORY_LIMIT, model=chosen)
    if len(rows) < answers:
        st.caption(f"The newest {len(rows):,} of {answers:,}; the CSV holds them all.")
    st.dataframe(
        history_table(rows),
        hide_index=True,
        column_config={
            "time": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
            "confidence": st.column_config.NumberColumn(format="%.1f%%"),
        },
    )
    st.download_button(
        "Download all answers (CSV)" if chosen is None else "Download this model's answers (CSV)",
        data=partial(db.export_csv, chosen),  # run on the click, not on every page view
        file_name="predictions.csv",
        mime="text/csv",
        on_click="ignore",
        icon=":material/download:",
    )
    st.caption(DRAWINGS_EXPORT)
    return models


def show_versions(models: list[dict]) -> None:
    """The model versions that were live: when, their figures at promotion, and the answers
    they gave (*models*: db.models_answering's rows)."""
    rows = registry.store.history_rows(registry.store.history(models))
    if not rows:
        return
    st.subheader("Model versions", anchor=False)
    st.caption(
        "Each version that served this app, newest first: when it was live, how it compared"
        " when promoted (README: Versions and promotion), and how often its answers were right."
    )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        column_config={
            "accuracy of its answers": st.column_config.NumberColumn(format="%.1f%%"),
        },
    )


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def model_label(name: str) -> str:
    return name or UNRECORDED_MODEL


def choose_model(models: list[dict]) -> str | None:
    """The model whose answers to show (None: all), chosen when more than one answered."""
    if len(models) == 1:
        st.caption(f"Every answer comes from the model {model_label(models[0]['model'])}.")
        return None
    by_name = {entry["model"]: entry for entry in models}

    def describe(name: str | None) -> str:
        if name is None:
            return "All models"
        entry = by_name[name]
        return (
            f"{model_label(name)}: {plural(entry['answers'], 'answer')}, "
            f"{entry['first_at']:%Y-%m-%d} to {entry['last_at']:%Y-%m-%d}"
        )

    return st.selectbox("Model", [None, *by_name], format_func=describe, key=MODEL_FILTER)


def confusion_chart(cells: list[dict]) -> alt.LayerChart:
    """Counts of (true label, predicted digit); only pairs that occurred are drawn, right
    answers in green, mistakes in red, each shade relative to its own kind."""
    frame = pd.DataFrame(cells, columns=["true_label", "predicted_digit", "answers"])
    digits = list(range(10))
    base = alt.Chart(frame).encode(
        x=alt.X(
            "predicted_digit:O",
            title="model said",
            scale=alt.Scale(domain=digits),
            axis=alt.Axis(orient="top", labelAngle=0),
        ),
        y=alt.Y("true_label:O", title="you drew", scale=alt.Scale(domain=digits)),
        tooltip=[
            alt.Tooltip("true_label:O", title="you drew"),
            alt.Tooltip("predicted_digit:O", title="model said"),
            alt.Tooltip("answers:Q", format=","),
        ],
    )

    def shaded(condition: str, colours: list[str]) -> alt.Chart:
        scale = alt.Scale(range=colours, zero=True)
        return (
            base.transform_filter(condition)
            .mark_rect()
            .encode(color=alt.Color("answers:Q", scale=scale, legend=None))
        )

    right = shaded("datum.true_label == datum.predicted_digit", ["#e5f5e0", "#41ab5d"])
    wrong = shaded("datum.true_label != datum.predicted_digit", ["#fee0d2", "#ef3b2c"])
    counts = base.mark_text(fontSize=11).encode(text=alt.Text("answers:Q", format=".3~s"))
    # A grey square behind the cells, so that pairs that never occurred read as empty.
    return (
        alt.layer(right, wrong, counts)
        .resolve_scale(color="independent")
        .configure_view(fill="#f4f4f6", stroke=None)
    )


def digit_table(rows: list[dict]) -> pd.DataFrame:
    """Per true label: answers, and the share the model read right (None without answers)."""
    by_digit = {row["true_label"]: row for row in rows}
    counts = [by_digit[d]["answers"] if d in by_digit else 0 for d in range(10)]
    right = [by_digit[d]["correct"] if d in by_digit else 0 for d in range(10)]
    return pd.DataFrame(
        {
            "digit": [str(digit) for digit in range(10)],
            "answers": counts,
            "accuracy": [100 * r / n if n else None for r, n in zip(right, counts, strict=True)],
        }
    )


def confusions_text(confused: list[dict], digits: list[dict]) -> str:
    if not confused:
        return "**Most often confused:** nothing yet, the model was right every time."
    drawn = {row["true_label"]: row["answers"] for row in digits}
    lines = ["**Most often confused:**"]
    for pair in confused:
        true_label, count = pair["true_label"], pair["answers"]
        times = "once" if count == 1 else f"{count:,} times"
        share = count / drawn[true_label]
        article = "an" if true_label == 8 else "a"
        lines.append(
            f"- {article} **{true_label}** read as **{pair['predicted_digit']}**: {times} "
            f"({share:.0%} of the {true_label}s)"
        )
    return "\n".join(lines)


def show_accuracy_over_time(model_filter: str | None) -> None:
    scale = st.radio(
        "Accuracy",
        [PER_ANSWERS, PER_DAY],
        horizontal=True,
        key=TIME_SCALE,
        label_visibility="collapsed",
    )
    per_day = scale == PER_DAY
    if per_day:
        points = db.accuracy_per_day(model_filter)
        x = alt.X("day:T", title="day (UTC)")
    else:
        points = db.accuracy_per_answers(model_filter, ANSWERS_PER_POINT)
        x = alt.X("last_answer:Q", title="answers")
    enough = (
        len({point["day"] for point in points}) > 1
        if per_day
        else points[-1]["last_answer"] > ANSWERS_PER_POINT
    )
    if not enough:
        wait = "answers on two days" if per_day else f"more than {ANSWERS_PER_POINT} answers"
        st.caption(f"The line appears with {wait}.")
        return
    frame = pd.DataFrame(points).drop(columns=["first_at", "last_at"], errors="ignore")
    frame["accuracy"] = frame["correct"] / frame["answers"]
    frame["model"] = frame["model"].map(model_label)
    if per_day:
        frame["day"] = pd.to_datetime(frame["day"])
    line = alt.Chart(frame).encode(
        x=x,
        y=alt.Y("accuracy:Q", axis=alt.Axis(format="%"), scale=alt.Scale(zero=False)),
        color=alt.Color(
            "model:N",
            legend=alt.Legend(orient="bottom", direction="vertical", title=None, labelLimit=0),
        ),
        tooltip=[
            alt.Tooltip("model:N"),
            alt.Tooltip("answers:Q", format=","),
            alt.Tooltip("accuracy:Q", format=".1%"),
        ],
    )
    chart = line.mark_line()
    if len(frame) <= MAX_DOTS:  # a dot per point, sized by its answers (a split group is small)
        size = alt.Size("answers:Q", scale=alt.Scale(range=[8, 50]), legend=None)
        chart += line.mark_circle().encode(size=size)
    st.altair_chart(chart, height=300, width="stretch")


def history_table(rows: list[dict]) -> pd.DataFrame:
    """Newest first, as the rows come; confidence in percent."""
    return pd.DataFrame(
        {
            "time": [row["created_at"] for row in rows],
            "predicted": [row["predicted_digit"] for row in rows],
            "true label": [row["true_label"] for row in rows],
            "confidence": [row["confidence"] * 100 for row in rows],
            "model": [model_label(row["model"] or "") for row in rows],
        }
    )


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # pgserver (the embedded database) logs every command it runs at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)


def main() -> None:
    st.set_page_config(page_title="MNIST Digit Classifier", page_icon=":material/draw:")
    st.html(PHONE_CSS)
    configure_logging()
    st.session_state.setdefault(CANVAS_GENERATION, 0)
    database_status()  # initialise the database once per process
    pages = st.navigation(
        [
            st.Page(draw_page, title="Draw", icon=":material/draw:", url_path="draw", default=True),
            st.Page(history_page, title="History", icon=":material/history:", url_path="history"),
        ]
    )
    pages.run()


if __name__ == "__main__":
    main()
