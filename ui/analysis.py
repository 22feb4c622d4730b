"""What the app makes of one drawing (`Analysis`): the canvas's PNG read as the model's 28x28
input, its strokes read from the canvas's fabric.js paths, the prediction, and the image the model
saw; with a shadow model set, its prediction too (stored with the answer, never shown)."""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

import drawings
import model
import utils
from utils import CANVAS_SIZE

logger = logging.getLogger("app")

MODEL_VIEW_SIZE = 140  # the 28x28 model input, shown 5x larger
MAX_DRAWING_SIDE = 4 * CANVAS_SIZE  # room for high-DPI screens, far below a memory hog


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
    # The shadow model that read the same input beside the live one, and what it made of it;
    # None where no shadow ran. Never shown: stored with the answer (db.log_prediction).
    shadow: tuple[str, model.Prediction] | None = None


def drawing_digest(png: bytes) -> str:
    return hashlib.blake2b(png, digest_size=16).hexdigest()


def analyse(
    png: bytes,
    digest: str,
    classifier: model.Compiled,
    model_name: str | None = None,
    canvas_objects: list | None = None,
    shadow: tuple[model.Compiled, str] | None = None,
) -> Analysis:
    """What *classifier* (named *model_name*) makes of the canvas's *png* and its fabric.js
    *canvas_objects*; with *shadow* (a model and its name), what it makes of the same input
    too."""
    start = time.perf_counter()
    try:
        batch = utils.preprocess(decode_drawing(png))
    except utils.EmptyImageError as exc:
        return Analysis(digest, hint=str(exc))
    except (utils.ImageFormatError, OSError, Image.DecompressionBombError) as exc:
        logger.warning("unreadable drawing: %s", exc)
        return Analysis(digest, hint="The drawing could not be read: clear the canvas and retry.")
    strokes, strokes_error = read_strokes(canvas_objects)
    trajectory = read_trajectory(strokes, strokes_error)
    prepared = time.perf_counter()
    prediction = model.predict(classifier, batch, trajectory)
    predicted = time.perf_counter()
    shadow_read = None
    if shadow is not None:
        shadow_model, shadow_name = shadow
        shadow_read = (shadow_name, model.predict(shadow_model, batch, trajectory))
    done = time.perf_counter()
    logger.info(
        "predicted %d (%.1f%%%s) in %.1f ms (preprocess %.1f ms, model %.1f ms%s)",
        prediction.digit,
        prediction.confidence * 100,
        "" if trajectory is not None else ", from the image alone",
        (done - start) * 1000,
        (prepared - start) * 1000,
        (predicted - prepared) * 1000,
        ""
        if shadow_read is None
        else f"; shadow {shadow_read[1].digit} in {(done - predicted) * 1000:.1f} ms",
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
        shadow=shadow_read,
    )


def read_strokes(canvas_objects: list | None) -> tuple[list | None, ValueError | None]:
    """The strokes of the canvas's fabric.js objects (`drawings.canvas_strokes`), or why they
    cannot be read (db.DrawingTooLarge, drawings.UnreadableDrawing)."""
    try:
        return drawings.canvas_strokes(canvas_objects or []), None
    except ValueError as exc:
        return None, exc


def read_trajectory(strokes: list | None, error: ValueError | None) -> torch.Tensor | None:
    """The drawing's trajectory for the model of the strokes (`utils.trajectory`); None where the
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
