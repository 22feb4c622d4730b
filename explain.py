"""Why the model read a drawing as it did: which parts of the ink moved it, and towards what.

The drawing's ink is cut into `PIECES` pieces of equal length, in the order it was drawn, and the
drawing is read again without each piece, as the app reads a drawing: drawn with the app's brush
(`utils.draw_strokes`), the image through `utils.preprocess`, the strokes through
`utils.trajectory`, then the model the app serves. A piece's *evidence* is how much its removal
lowers the answer's log-odds against the runner-up: positive, the piece pushed the model towards
the answer; negative, towards the runner-up. The same readings give each model's own evidence,
the image CNN's and the model of the strokes'; the pair's is their sum (the pair's answer is the
normalised product of theirs, so its log-odds are the sum of theirs).

Occlusion of the ink, not gradients of the inputs: removing the ink it ranks first lowers the
served model's confidence far more than removing as much ink at random, and more than removing
what integrated gradients or gradient x input rank first (`python -m lab.evaluate
--explanations`; docs/explanations.md). It asks what a person asks, "what if this part were not
there?", of the whole pipeline the app runs, and needs no library beside torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

import model as model_lib
import utils

PIECES = 16  # the ink cut into so many pieces of equal length: 17 readings per explanation
SPACING_PX = 2.0  # the strokes sampled this far apart along the canvas's curves
# The colours of the evidence: towards the answer (the probability bars' blue), towards the
# runner-up, neither (the ink's grey on the canvas's black).
ANSWER_RGB = np.array((70, 150, 255))
RUNNER_UP_RGB = np.array((255, 75, 75))
NEUTRAL_RGB = np.array((120, 120, 120))
BACKGROUND_RGB = (0, 0, 0)  # the canvas's
CONTRAST = 0.6  # the evidence's share of the strongest, raised to this: weak evidence shows too


@dataclass(frozen=True)
class Explanation:
    """The evidence for `answer` against `runner_up` of each point of a drawing's ink."""

    answer: int
    runner_up: int
    strokes: list[np.ndarray]  # each stroke's points (n, 2), canvas px, SPACING_PX apart
    both: list[np.ndarray]  # per stroke, each point's evidence for the pair (log-odds)
    image: list[np.ndarray]  # ... for the image CNN alone
    trajectory: list[np.ndarray] | None  # ... for the model of the strokes (None: no such model)


def explain(
    net: torch.nn.Module,
    strokes: list,
    answer: int,
    runner_up: int,
    brush: float = utils.BRUSH_WIDTH,
) -> Explanation:
    """The evidence of each piece of a drawing's `strokes` (canvas px, y down) for `answer`
    against `runner_up`, as `net` reads them (a `model.DigitCNN`, or the `model.Compiled` the app
    serves: explained through the DigitCNN it compiled, the same weights). Raises
    utils.EmptyImageError for strokes without a point."""
    if isinstance(net, model_lib.Compiled):
        net = net.net
    lines = sample(strokes)
    if not lines:
        raise utils.EmptyImageError("Nothing is drawn yet: draw a digit on the canvas.")
    pieces = piece_of_each_point(lines, PIECES)
    drawings = [lines] + [without(lines, [p == k for p in pieces]) for k in range(PIECES)]
    image, trajectory = log_odds(net, drawings, brush, answer, runner_up)
    image = image[0] - image[1:]  # what each piece's removal took away
    if trajectory is None:
        points = [image[p] for p in pieces]
        return Explanation(answer, runner_up, lines, points, points, None)
    trajectory = trajectory[0] - trajectory[1:]
    return Explanation(
        answer,
        runner_up,
        lines,
        [(image + trajectory)[p] for p in pieces],
        [image[p] for p in pieces],
        [trajectory[p] for p in pieces],
    )


def sample(strokes: list) -> list[np.ndarray]:
    """Each stroke (canvas px) as points SPACING_PX apart along the curve the canvas draws
    through it (`utils.canvas_path`); strokes without a point left out."""
    return [
        utils.resample(utils.canvas_path(np.asarray(s, np.float64).reshape(-1, 2)), SPACING_PX)
        for s in strokes
        if len(s)
    ]


def piece_of_each_point(lines: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Per stroke, each point's piece when the ink, in the order drawn, is cut into `count`
    pieces of equal length (the points are evenly spaced along it)."""
    total = sum(len(line) for line in lines)
    which = np.minimum(np.arange(total) * count // total, count - 1)
    return np.split(which, np.cumsum([len(line) for line in lines])[:-1])


def without(lines: list[np.ndarray], removed: list[np.ndarray]) -> list[np.ndarray]:
    """The strokes without the points that `removed` marks (per stroke, one bool per point): a
    stroke cut in the middle becomes two."""
    kept = []
    for line, gone in zip(lines, removed, strict=True):
        edges = np.diff(np.concatenate([[True], gone, [True]]).astype(np.int8))
        starts, ends = np.flatnonzero(edges == -1), np.flatnonzero(edges == 1)
        kept += [line[start:end] for start, end in zip(starts, ends, strict=True)]
    return kept


def log_odds(
    net: model_lib.DigitCNN, drawings: list[list[np.ndarray]], brush: float, a: int, b: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Each drawing's log-odds of digit `a` against `b`, read as the app reads a drawing: by the
    image CNN, and by the model of the strokes (None without one). A drawing that no longer
    holds a digit (all its ink removed) has lost all its evidence: 0."""
    images, trajectories, readable = [], [], np.zeros(len(drawings), bool)
    for index, lines in enumerate(drawings):
        try:
            image = utils.preprocess(utils.draw_strokes(lines, brush))
            trajectory = utils.trajectory(lines)
        except ValueError:  # utils.EmptyImageError: nothing left that reads as a digit
            continue
        images.append(image)
        trajectories.append(trajectory)
        readable[index] = True
    image_odds = np.zeros(len(drawings))
    stroke_odds = None if net.trajectory is None else np.zeros(len(drawings))
    if not images:
        return image_odds, stroke_odds
    with torch.inference_mode():
        out = torch.log_softmax(net(torch.cat(images)), 1)
        image_odds[readable] = (out[:, a] - out[:, b]).numpy()
        if stroke_odds is not None:
            out = torch.log_softmax(net.trajectory(torch.cat(trajectories)), 1)
            stroke_odds[readable] = (out[:, a] - out[:, b]).numpy()
    return image_odds, stroke_odds


def picture(
    lines: list[np.ndarray], evidence: list[np.ndarray], size: int, brush: float = utils.BRUSH_WIDTH
) -> bytes:
    """The drawing as a PNG `size` px square, cropped to its ink, the ink coloured by
    `evidence`: blue where it pushed towards the answer, red towards the runner-up, the more
    saturated the stronger (the strongest of this map in full colour); grey where it did
    neither."""
    strongest = max(float(np.abs(values).max()) for values in evidence) or 1.0
    canvas = Image.new("RGB", (utils.CANVAS_SIZE, utils.CANVAS_SIZE), BACKGROUND_RGB)
    pen = ImageDraw.Draw(canvas)
    radius = brush / 2
    for line, values in zip(lines, evidence, strict=True):
        for (x, y), value in zip(line, values, strict=True):
            towards = ANSWER_RGB if value > 0 else RUNNER_UP_RGB
            weight = min(1.0, abs(value) / strongest) ** CONTRAST
            colour = tuple(int(c) for c in NEUTRAL_RGB + weight * (towards - NEUTRAL_RGB))
            pen.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    points = np.concatenate(lines)
    centre = (points.min(axis=0) + points.max(axis=0)) / 2
    half = np.ptp(points, axis=0).max() / 2 + brush  # a square around the ink, a brush spare
    box = tuple(int(round(v)) for v in (*(centre - half), *(centre + half)))
    buffer = io.BytesIO()
    canvas.crop(box).resize((size, size), Image.Resampling.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()
