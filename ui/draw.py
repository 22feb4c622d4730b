"""The Draw page (the default): a canvas, the model's guess, and the feedback row that confirms
or corrects it.

app.py runs this file as a page (st.navigation); tests import it. What must outlive a run (the
model, the session_state keys, the callbacks) is in ui.serving and ui.session, imported.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import streamlit as st

import feedback
import model
import settings
from ui.analysis import MODEL_VIEW_SIZE, Analysis
from ui.serving import current_classifier, database_status
from ui.session import (
    CORRECT_BUTTON,
    SAVED_MESSAGE,
    SUBMIT_CORRECTION_BUTTON,
    TRUE_LABEL_INPUT,
    canvas_key,
    confirm_prediction,
    current_analysis,
    feedback_key,
    save_requested_feedback,
    submit_correction,
)
from ui.why import show_why
from utils import BRUSH_WIDTH, CANVAS_SIZE

if TYPE_CHECKING:
    from streamlit_drawable_canvas import CanvasResult

INSTRUCTIONS = (
    "Draw a digit (0-9) in the black square. Is the guess right? Press **Correct**. "
    "If not, type the digit you drew and press **Submit correction**."
)
NOTHING_DRAWN = "Nothing drawn yet: the guess appears here."
DATABASE_DOWN_BANNER = (
    "Database unreachable: predictions work, but feedback cannot be saved until it is back."
)
DRAWINGS_KEPT = "Your drawings are kept to improve the model."
# A digit's probability from which the bars label it and the runner-up is named under the
# prediction: below it, the second guess is noise to a person (one in twenty or less).
SHOWN_SHARE = 0.05


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
    if settings.store_drawings():
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
        if analysis is not None and analysis.prediction is not None:
            show_why(analysis, classifier, name)
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


def show_prediction(analysis: Analysis | None) -> None:
    if analysis is None or analysis.prediction is None:
        st.info(analysis.hint if analysis else NOTHING_DRAWN)
        return
    prediction = analysis.prediction
    with st.container(horizontal=True, vertical_alignment="center", gap="medium"):
        st.subheader(f"Prediction: {prediction.digit}", anchor=False, width="content")
        st.markdown(f"**Confidence: {prediction.confidence:.1%}**", width="content")
    if line := runner_up_line(prediction):
        st.markdown(line)


def runner_up_line(prediction: model.Prediction) -> str | None:
    """ "or a 1 (12.0%)": the second most likely digit, as the bars show it, when it has at least
    SHOWN_SHARE of the probability; else None."""
    second = sorted(range(10), key=lambda digit: -prediction.probabilities[digit])[1]
    probability = prediction.probabilities[second]
    return f"or a {second} ({probability:.1%})" if probability >= SHOWN_SHARE else None


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
    drawing on one machine, the browsers set the pace, not the app (docs/benchmarks.md,
    "Per-core capacity")."""
    bars, spoken = [], []
    for digit, probability in enumerate(prediction.probabilities):
        percent = f"{probability:.1%}"
        spoken.append(f"{digit}: {percent}")
        label = percent if probability >= SHOWN_SHARE else "&nbsp;"
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


if __name__ == "__main__":  # run as a page by st.navigation (app.py)
    draw_page()
