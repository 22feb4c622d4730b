"""drawings.py on real canvas JSON (tests/data/canvas: drawn in Chromium with the mouse and a
finger, see its README): the strokes kept are the canvas's own, and they draw back into the 28x28
image the model read."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, aligned_difference
from PIL import Image

import db
import drawings
import model
import utils

CAPTURES = ROOT / "tests" / "data" / "canvas"
NAMES = ["mouse0", "mouse1", "mouse4", "mouse7", "touch7"]
# "The same image": the model reads the same digit, and the pixels differ by at most this on
# average (of 255), once aligned by at most one pixel (conftest.aligned_difference). Measured:
# 0.57 to 1.26.
MAX_MEAN_DIFFERENCE = 3.0


def capture(name: str) -> tuple[list[dict], np.ndarray]:
    """The canvas's objects and the 28x28 image the app read from its PNG."""
    objects = json.loads((CAPTURES / f"{name}.json").read_text())["objects"]
    png = np.asarray(Image.open(io.BytesIO((CAPTURES / f"{name}.png").read_bytes())))
    return objects, utils.to_pixels(utils.preprocess(png))


@pytest.fixture(scope="module")
def classifier() -> model.DigitCNN:
    return model.load_model(ROOT / "models" / "model.pth")


@pytest.mark.parametrize("name", NAMES)
def test_a_stored_drawing_draws_back_into_the_image_the_model_read(name, classifier):
    objects, read = capture(name)
    drawing = drawings.from_canvas(objects, utils.CANVAS_SIZE, utils.BRUSH_WIDTH, read.tobytes())
    assert np.array_equal(drawings.stored_image(drawing), read)
    again = drawings.model_image(drawing)
    digit = int(name[-1])
    assert model.predict(classifier, utils.normalize(read)[None, None]).digit == digit
    assert model.predict(classifier, utils.normalize(again)[None, None]).digit == digit
    assert aligned_difference(again, read) <= MAX_MEAN_DIFFERENCE


@pytest.mark.parametrize("name", NAMES)
def test_real_canvas_strokes_are_read_by_the_model_of_the_strokes_as_their_digit(name, classifier):
    """A browser's strokes (every pointer event, mouse or finger; not a tablet's 100 ms points)
    as the app hands them over: the model of the strokes alone reads the digit drawn, and so
    does the app's answer from both models."""
    objects, read = capture(name)
    trajectory = utils.trajectory(drawings.canvas_strokes(objects))
    with torch.inference_mode():
        assert int(classifier.trajectory(trajectory).argmax()) == int(name[-1])
    image = utils.normalize(read)[None, None]
    assert model.predict(classifier, image, trajectory).digit == int(name[-1])


@pytest.mark.parametrize("name", NAMES)
def test_the_strokes_are_the_points_the_canvas_sampled(name):
    """One stroke per fabric.js path; its points are the Q control points and the L end, so the
    canvas's curves (through their midpoints) are those utils.canvas_path draws."""
    objects, read = capture(name)
    drawing = drawings.from_canvas(objects, utils.CANVAS_SIZE, utils.BRUSH_WIDTH, read.tobytes())
    assert len(drawing.strokes) == len(objects)
    for obj, stroke in zip(objects, drawing.strokes, strict=True):
        path = obj["path"]
        assert stroke[:-1] == [[round(v, 3) for v in c[1:3]] for c in path if c[0] == "Q"]
        assert stroke[-1] == [round(v, 3) for v in path[-1][1:]] and path[-1][0] == "L"
        # (the L end is nudged by brush/1000 px, so the last midpoint by half that)
        for (_, _, _, x, y), (px, py), (qx, qy) in zip(
            path[1:-1], stroke[:-1], stroke[1:], strict=True
        ):
            assert (x, y) == pytest.approx(((px + qx) / 2, (py + qy) / 2), abs=0.01)


def test_a_stroke_moved_or_scaled_with_the_edit_toggle_is_stored_where_it_is_shown():
    objects, read = capture("mouse7")
    plain = drawings.from_canvas(objects, 280, 18, read.tobytes()).strokes
    moved = copy.deepcopy(objects)
    moved[2]["left"] += 30  # the crossbar, dragged 30 px right and 10 px down
    moved[2]["top"] += 10
    moved[0]["scaleX"] = 0.5  # the top bar, half as wide around its centre
    strokes = [
        np.array(stroke) for stroke in drawings.from_canvas(moved, 280, 18, b"\0" * 784).strokes
    ]
    before = [np.array(stroke) for stroke in plain]
    assert np.array_equal(strokes[1], before[1])
    np.testing.assert_allclose(strokes[2], before[2] + (30, 10), atol=2e-3)
    centre = objects[0]["left"]
    np.testing.assert_allclose(strokes[0][:, 0], (before[0][:, 0] - centre) / 2 + centre, atol=0.02)
    np.testing.assert_allclose(strokes[0][:, 1], before[0][:, 1], atol=2e-3)


def test_a_dot_is_a_stroke_of_one_point_and_other_objects_are_left_out():
    path = [["M", 99.982, 50], ["L", 100.018, 50]]  # as fabric.js draws a click
    dot = {"type": "Path", "left": 100, "top": 50, "path": path}
    rect = {"type": "Rect", "left": 0, "top": 0, "width": 10, "height": 10}
    drawing = drawings.from_canvas([rect, dot], 280, 18, bytes(784))
    assert drawing.strokes == [[[100.0, 50.0]]]


@pytest.mark.parametrize(
    "objects",
    [
        [],
        [{"type": "Rect"}],
        [{"type": "Path"}],
        [{"type": "Path", "path": [["Z"]]}],
        [{"type": "Path", "path": [["M", "x", 1]]}],
        [{"type": "Path", "path": [["M", float("nan"), 1], ["L", 1, 1]]}],
        [{"type": "Path", "left": 450.5, "top": 1, "path": [["M", 1, 1], ["L", 900, 1]]}],
    ],
    ids=range(7),
)
def test_what_is_not_a_drawing_is_unreadable(objects):
    with pytest.raises(drawings.UnreadableDrawing):
        drawings.from_canvas(objects, 280, 18, bytes(784))


def test_an_oversized_drawing_is_refused_before_its_points_are_read():
    path = [["M", 1, 1], *[["Q", 1, 1, 1, 1]] * (db.MAX_POINTS + 10), ["L", 1, 1]]
    with pytest.raises(db.DrawingTooLarge):
        drawings.from_canvas([{"type": "Path", "path": path}], 280, 18, bytes(784))
    with pytest.raises(db.DrawingTooLarge):
        drawings.from_canvas([{"type": "Path", "path": []}] * 101, 280, 18, bytes(784))
