"""One browser session on the Draw page: its session_state keys, the analysis of the drawing on
the canvas (made once per drawing), and an answer from a click to a stored row (the feedback
buttons' callbacks run before the rerun they trigger, then the save).

Imported by the pages and app.py, never run as a page: the keys, the callbacks and the classes of
what session_state holds are the same objects over every run.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, NoReturn

import streamlit as st
from streamlit.errors import StreamlitAPIException

import db
import drawings
import feedback
import model
import settings
from ui.analysis import Analysis, analyse, drawing_digest
from ui.serving import shadow_classifier, store
from utils import BRUSH_WIDTH, CANVAS_SIZE

if TYPE_CHECKING:
    from streamlit_drawable_canvas import CanvasResult

logger = logging.getLogger("app")

# The canvas's PNG data URL, checked before it is decoded: a drawing is tens of kB, a 4x screen's
# noisiest a few MB. Streamlit refuses any message over server.maxMessageSize (.streamlit).
MAX_DRAWING_URL_CHARS = 4_000_000

# session_state keys
CANVAS_GENERATION = "canvas_generation"  # int; the canvas key is f"canvas-{n}", bumped to clear it
ANALYSIS = "analysis"  # Analysis of the last drawing seen, reused while the drawing is unchanged
PENDING_SUBMISSION = "pending_submission"  # feedback.Submission not stored yet, kept for a retry
SAVE_REQUEST = "save_request"  # (Analysis, true label) of a click, saved below the feedback row
FEEDBACK_ERROR = "feedback_error"  # str shown under the feedback row
SAVED_MESSAGE = "saved_message"  # str shown after a stored answer, until the next drawing
# ui.why.Pictures of the drawing on screen, while "Why?" is open; kept while the drawing and the
# model that read it are the same
EXPLANATION = "explanation"

# widget keys: f"{name}-{drawing digest}" (see feedback_key)
TRUE_LABEL_INPUT = "true_label"
WHY_TOGGLE = "why"  # "Why?": the explanation shown, from one drawing to the next, until closed
CORRECT_BUTTON = "correct"
SUBMIT_CORRECTION_BUTTON = "submit_correction"

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
DRAWING_TOO_LARGE_TO_KEEP = (
    "Not saved: this drawing is too large to keep ({}). Clear the canvas and draw the digit "
    "with fewer, shorter strokes."
)
DRAWING_UNREADABLE = "Not saved: the drawing could not be read. Clear the canvas and draw again."


# --- the drawing on the canvas ---------------------------------------------------------------


def canvas_key() -> str:
    return f"canvas-{st.session_state[CANVAS_GENERATION]}"


def current_analysis(
    canvas: CanvasResult, classifier: model.Compiled, model_name: str
) -> Analysis | None:
    """The analysis of the drawing on the canvas; None while nothing is drawn.

    Computed once per drawing: reruns that leave the drawing unchanged reuse it. Read by the
    shadow model too, if one is set then (ui.serving.shadow_classifier): the analysis keeps
    what read it, so an answer stores the shadow that read its drawing, or none.
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
        objects = canvas.json_data["objects"]
        analysis = analyse(png, digest, classifier, model_name, objects, shadow_classifier())
    state[ANALYSIS] = analysis
    # Messages about the previous drawing no longer apply.
    state.pop(FEEDBACK_ERROR, None)
    state.pop(SAVED_MESSAGE, None)
    return analysis


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
        store(submission, analysis.model_name, drawing, analysis.shadow)
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
    if not settings.store_drawings():
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
    for key in (ANALYSIS, PENDING_SUBMISSION, FEEDBACK_ERROR, EXPLANATION):
        state.pop(key, None)
