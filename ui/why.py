"""The Draw page's "Why?": what made the model decide, drawn on the drawing (`explain.py`).

Closed by default: the explanation is computed only while it is open, once per drawing and
model (kept in the session while both stay the same), never on a rerun that changed neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

import explain
import model
from ui.analysis import Analysis
from ui.session import EXPLANATION, WHY_TOGGLE

PICTURE_PX = 96  # each map: three side by side on a 360 px phone
WHY_HELP = "What in your drawing made the model decide: computed when you open it."


@dataclass(frozen=True)
class Pictures:
    """The explanation of one drawing by one model, as shown: PNGs with their captions."""

    drawing_digest: str
    model_name: str | None
    legend: str
    maps: tuple[tuple[bytes, str], ...]  # (PNG, caption)


def show_why(analysis: Analysis, classifier: model.Compiled, model_name: str) -> None:
    """The "Why?" toggle and, while it is on, the maps of the drawing's evidence."""
    if not st.toggle("Why?", key=WHY_TOGGLE, help=WHY_HELP):
        return
    if analysis.strokes is None:
        st.caption("No explanation: the drawing's strokes could not be read.")
        return
    if analysis.model_name != model_name:  # a new version went live since it was read
        st.caption("The model changed since this drawing was read: draw again to see why.")
        return
    pictures = st.session_state.get(EXPLANATION)
    if not (
        isinstance(pictures, Pictures)
        and pictures.drawing_digest == analysis.drawing_digest
        and pictures.model_name == model_name
    ):
        pictures = explanation_pictures(analysis, classifier, model_name)
        st.session_state[EXPLANATION] = pictures
    st.caption(pictures.legend)
    with st.container(horizontal=True, gap="small", key="why_maps"):
        for png, caption in pictures.maps:
            st.image(png, caption=caption, width=PICTURE_PX, output_format="PNG")


def explanation_pictures(
    analysis: Analysis, classifier: model.Compiled, model_name: str | None
) -> Pictures:
    """`explain.explain` of the drawing's answer against its runner-up, drawn."""
    probabilities = analysis.prediction.probabilities
    answer, runner_up = sorted(range(10), key=lambda digit: -probabilities[digit])[:2]
    found = explain.explain(classifier, analysis.strokes, answer, runner_up)
    maps = [
        (found.both, "Both models"),
        (found.image, "The image"),
        (found.trajectory, "The strokes"),
    ]
    if found.trajectory is None:  # a model of the image alone
        maps = [(found.image, "The image")]
    return Pictures(
        analysis.drawing_digest,
        model_name,
        f"Blue: ink that made it a {answer}. Red: ink that looked more like a {runner_up}, "
        f"the runner-up. Grey: neither.",
        tuple(
            (explain.picture(found.strokes, evidence, PICTURE_PX * 2), caption)
            for evidence, caption in maps
        ),
    )
