"""Helpers for tests of the app: model files, and drawings as the canvas sends them.

Plain functions (no fixtures), so any test module can import them: ``import fixtures_app``.
Tiny MNIST data sets for train.py: see mnist_files.py.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import model

CANVAS_SIZE = 280
BRUSH_WIDTH = 18

# Strokes (polylines in canvas pixels) that read as the digit to a person.
STROKES = {
    1: [[(140, 40), (140, 240)]],
    4: [[(170, 240), (170, 40), (70, 170), (210, 170)]],
    7: [[(70, 50), (210, 50), (120, 240)]],
}


def save_untrained_model(path: Path, seed: int = 0) -> Path:
    """A valid, untrained model file (what train.py writes: a DigitCNN state_dict)."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.DigitCNN().state_dict(), path)
    return path


def drawing_png(strokes: list[list[tuple[int, int]]], size: int = CANVAS_SIZE) -> bytes:
    """A PNG like the canvas sends: opaque RGBA, white ink on black."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    pen = ImageDraw.Draw(image)
    for line in strokes:
        pen.line(line, fill=(255, 255, 255, 255), width=BRUSH_WIDTH, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digit_png(digit: int) -> bytes:
    return drawing_png(STROKES[digit])


def canvas_value(png: bytes) -> dict:
    """The value streamlit-drawable-canvas 0.13 holds in session_state under its key.

    In AppTest, ``at.session_state[f"canvas-{n}"] = canvas_value(png)`` then ``at.run()``
    is what a browser does when someone draws.
    """
    data_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    # One placeholder object: the app only checks that something is drawn.
    objects = [{"type": "path", "stroke": "#FFFFFF", "strokeWidth": BRUSH_WIDTH}]
    return {
        "drawing": {"raw": {"objects": objects, "background": "#000000"}, "data": data_url},
        "backgroundFit": None,
    }


def blank_canvas_value() -> dict:
    """The canvas after its clear button: drawn on once, nothing left."""
    value = canvas_value(drawing_png([]))
    value["drawing"]["raw"]["objects"] = []
    return value
