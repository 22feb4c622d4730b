"""The drawing kept with each answer: the canvas's strokes, read from its fabric.js JSON, and drawn
back into the 28x28 image the model reads.

The canvas (streamlit-drawable-canvas, fabric.js 7) records a stroke as a ``Path`` object whose
``path`` is a list of SVG commands through the pointer positions it sampled, p0 ... pn:
``["M", p0]``, then ``["Q", p(i), midpoint(p(i), p(i+1))]`` for each sampled point but the last,
then ``["L", pn]`` (M and L are nudged by brush/1000 px). ``from_canvas`` keeps those sampled
points (the Q control points and the L end), in canvas pixels: nothing is lost, and
``utils.canvas_path`` draws the same curves through them again, as ``utils.draw_strokes`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

import db
import utils

DECIMALS = 3  # canvas px; fabric.js's own coordinates carry float32 noise beyond this
UNMOVED_PX = 0.5  # a path whose centre is this close to where fabric.js put it was never moved
PATH_TYPES = ("Path", "path")  # fabric.js 7 writes "Path", older versions "path"


class UnreadableDrawing(ValueError):
    """The canvas's JSON is not a drawing this module can read."""


def from_canvas(
    objects: Sequence[dict[str, Any]],
    canvas_size: int,
    brush_width: float,
    image: bytes,
) -> db.Drawing:
    """The drawing behind the canvas JSON's *objects* (``json_data["objects"]``): one stroke per
    freedraw path, in drawing order; other objects (none in this app) are left out.

    Raises db.DrawingTooLarge over the limits (counted before any point is converted), and
    UnreadableDrawing (a ValueError) for anything that is not a path of numbers."""
    return as_drawing(canvas_strokes(objects), canvas_size, brush_width, image)


def as_drawing(
    strokes: list[list[list[float]]], canvas_size: int, brush_width: float, image: bytes
) -> db.Drawing:
    """The drawing of strokes `canvas_strokes` read, checked as `from_canvas` checks it."""
    try:
        return db.Drawing(strokes, canvas_size, float(brush_width), image)
    except db.DrawingTooLarge:
        raise
    except ValueError as exc:
        raise UnreadableDrawing(str(exc)) from exc


def canvas_strokes(objects: Sequence[dict[str, Any]]) -> list[list[list[float]]]:
    """The strokes of the canvas JSON's *objects*: each the points the canvas sampled, [x, y]
    in canvas pixels, in drawing order (`from_canvas`, which raises what this raises)."""
    paths = [obj for obj in objects if isinstance(obj, dict) and obj.get("type") in PATH_TYPES]
    commands = [obj.get("path") for obj in paths]
    if not all(isinstance(path, list) for path in commands):
        raise UnreadableDrawing("a path without commands")
    # Each command is one point at most: refuse an oversized drawing before converting it.
    total = sum(len(path) for path in commands)
    if len(paths) > db.MAX_STROKES or total > db.MAX_POINTS + 2 * len(paths):
        raise db.DrawingTooLarge(
            f"{len(paths)} strokes, about {total} points "
            f"(at most {db.MAX_STROKES} strokes, {db.MAX_POINTS} points)"
        )
    strokes = [_stroke(obj, path) for obj, path in zip(paths, commands, strict=True)]
    if not strokes:
        raise UnreadableDrawing("no strokes")
    return strokes


def _stroke(obj: dict[str, Any], path: list[Any]) -> list[list[float]]:
    """The sampled points of one path, in canvas pixels (its own transform applied: a stroke
    moved, scaled or rotated with the canvas toolbar's edit toggle is stored where it is shown)."""
    try:
        points, ends = [], []  # the sampled points; the M and curve ends (for a dot)
        for command in path:
            kind, *values = command
            xy = [float(v) for v in values]
            if kind == "M" and len(xy) == 2:
                ends.append(xy)
            elif kind == "Q" and len(xy) == 4:
                points.append(xy[:2])
                ends.append(xy[2:])
            elif kind == "L" and len(xy) == 2:
                points.append(xy)
                ends.append(xy)
            else:
                raise UnreadableDrawing(f"unexpected path command {kind!r}")
        if len(points) == 1 and len(ends) == 2:  # no curve: M, L
            (mx, my), (lx, ly) = ends
            # A dot (a click): M and L only nudged apart. Else a straight line.
            points = [[(mx + lx) / 2, (my + ly) / 2]] if math.dist(*ends) < 0.1 else ends
        elif not points:  # M alone
            points = ends[:1]
        if not points or not all(math.isfinite(v) for p in points + ends for v in p):
            raise UnreadableDrawing("a path without finite points")
        matrix = _own_matrix(obj)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, UnreadableDrawing):
            raise
        raise UnreadableDrawing(f"unreadable path: {exc}") from exc
    if matrix is not None:
        offset = _path_centre(path)
        points = [
            [
                matrix[0] * (x - offset[0]) + matrix[2] * (y - offset[1]) + matrix[4],
                matrix[1] * (x - offset[0]) + matrix[3] * (y - offset[1]) + matrix[5],
            ]
            for x, y in points
        ]
    return [[round(x, DECIMALS), round(y, DECIMALS)] for x, y in points]


def _own_matrix(obj: dict[str, Any]) -> tuple[float, ...] | None:
    """fabric.js's calcOwnMatrix (a, b, c, d, e, f) for a path centred on (left, top), or None
    when the path is drawn where its commands say (the canvas's own strokes, never edited)."""
    if obj.get("originX", "center") != "center" or obj.get("originY", "center") != "center":
        raise UnreadableDrawing("a path not positioned by its centre")
    left, top = float(obj.get("left", 0)), float(obj.get("top", 0))
    scale_x = float(obj.get("scaleX", 1)) * (-1 if obj.get("flipX") else 1)
    scale_y = float(obj.get("scaleY", 1)) * (-1 if obj.get("flipY") else 1)
    angle, skew_x, skew_y = (float(obj.get(k, 0)) for k in ("angle", "skewX", "skewY"))
    if (scale_x, scale_y, angle, skew_x, skew_y) == (1, 1, 0, 0, 0):
        # fabric.js's bounds of a sharp turn differ from the exact ones by up to ~0.1 px.
        centre = _path_centre(obj["path"])
        if abs(centre[0] - left) < UNMOVED_PX and abs(centre[1] - top) < UNMOVED_PX:
            return None
    # translate(left, top) . rotate(angle) . scale . skewX . skewY, as fabric.js composes them.
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    tan_x, tan_y = math.tan(math.radians(skew_x)), math.tan(math.radians(skew_y))
    # scale . skewX . skewY as a 2x2 [[a, c], [b, d]]
    a, c = scale_x * (1 + tan_x * tan_y), scale_x * tan_x
    b, d = scale_y * tan_y, scale_y
    return (
        cos * a - sin * b,
        sin * a + cos * b,
        cos * c - sin * d,
        sin * c + cos * d,
        left,
        top,
    )


def _path_centre(path: list[Any]) -> tuple[float, float]:
    """The centre of the path's exact bounding box (fabric.js's pathOffset)."""
    xs, ys = [], []
    start = None
    for kind, *values in path:
        xy = [float(v) for v in values]
        if kind == "Q" and start is not None:
            # A quadratic's extreme lies at t = (p0 - c) / (p0 - 2c + p1), if within (0, 1).
            for axis, out in ((0, xs), (1, ys)):
                p0, ctrl, p1 = start[axis], xy[axis], xy[2 + axis]
                denominator = p0 - 2 * ctrl + p1
                if denominator and 0 < (t := (p0 - ctrl) / denominator) < 1:
                    out.append((1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p1)
            xy = xy[2:]
        xs.append(xy[0])
        ys.append(xy[1])
        start = xy
    return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2


def model_image(drawing: db.Drawing) -> np.ndarray:
    """The 28x28 uint8 image the model would read from the drawing's strokes, drawn again."""
    canvas = utils.draw_strokes(drawing.strokes, drawing.brush_width, drawing.canvas_size)
    return utils.to_pixels(utils.preprocess(canvas))


def stored_image(drawing: db.Drawing) -> np.ndarray:
    """The 28x28 uint8 image the model read when the answer was given, as stored."""
    return np.frombuffer(drawing.image, dtype=np.uint8).reshape(utils.FRAME_SIZE, -1)
