"""Measure a model the way the app uses it: raw images through `utils.preprocess`, strokes (where a
set has them) through `utils.trajectory`, then `predict`.

Besides MNIST's test set this builds a "drawn" set: MNIST test digits redrawn the way people draw
on the app's 280x280 canvas, with a solid brush of some width, small or large, anywhere on the
canvas, in either polarity, in colour, or on a transparent background. A model that only works
on MNIST's own framing fails here; one that works through `utils.preprocess` does not.

A third set, "pen", traces each digit's centre line with a round brush of one width, as a pen
stroke drawn on the canvas looks: even strokes, round ends, no pressure. MNIST digits were
scanned from paper, so their strokes vary in width; what people draw in the app does not.

The fourth set, "styles", owes nothing to MNIST: hand-made pen templates of the ways people write
each digit, some of them rare in MNIST (a 1 with a flag and a base, a crossed 7, a closed 4, a
slashed 0), drawn with the app's 18 px brush, bent, slanted and sized at random. Their strokes
go to the model too, as a mouse would sample them: the app's answer, both models'. The first
three sets are images, read by the image CNN alone (their strokes are not a person's).

The fifth, "pen digits, writers not trained on", is real handwriting: the digits of the pen
writers the model was trained without (`pen_held_out.writers` in its model.json), drawn from
their recorded strokes with the app's brush exactly as train.py measured them, with the strokes,
per digit and with the worst confusions; and the image alone, what the CNN makes of them.

Each set's expected calibration error (15 equal-width confidence bins) is printed beside its
accuracy: how far the confidence the app shows is from how often it is right.

    python -m lab.evaluate                          # the shipped model on all five sets
    python -m lab.evaluate --write                  # ... and the figures into models/model.json
    python -m lab.evaluate --drawn 8000 --seed 11   # larger drawn and pen sets, other digits
    python -m lab.evaluate --simulate-people         # people's answers: learnt from? (below)
    python -m lab.evaluate --explanations            # the Draw page's "Why?": faithful?

`--simulate-people` plays the feedback loop with handwriting the shipped model never saw: the
first `--answers` digits of each of `--people-writers` (held-out pen writers) are answered as in
the app (`lab/people.py`: prediction and drawing stored by `db.log_prediction` in a throwaway
PostgreSQL), then the loop's own command runs: `train.py --sources mnist,pen,feedback --init
<live> --promote` (its fine-tune defaults; `--train-args` adds flags), the shipped model being
the registry's first live version. It prints the promotion table and the errors of the shipped
model, the candidate and the new live model (the candidate if promoted, else the shipped one) on
those writers' other digits, on the other held-out writers (trained on by neither) and on
MNIST's test set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import db
import mnist
import model as model_lib
import pendigits
import utils
from training import metrics, sources
from training.checkpoints import atomic_write_text
from utils import BRUSH_WIDTH, CANVAS_SIZE

MOUSE_STEP_PX = 3.0  # how far apart a mouse's samples of a stroke are, at most
# Pen digits use brush widths around the app's (px on the 280 px canvas).
PEN_BRUSH_WIDTHS = (10, 26)
PEN_DIGIT_SIZES = (80, 250)
DRAWN_STYLES = (
    "small",
    "large",
    "off-centre",
    "thick brush",
    "thin brush",
    "dark on light",
    "coloured ink",
    "transparent",
)


@dataclass(frozen=True)
class DrawnDigit:
    image: np.ndarray
    label: int
    style: str
    # Its strokes as the canvas would sample them (canvas pixels, y down), where a hand's strokes
    # are known (writing styles); None: an image (MNIST re-drawn), read by the image CNN alone.
    strokes: list[np.ndarray] | None = None


def drawn_digits(
    images: torch.Tensor, labels: torch.Tensor, count: int = 2000, seed: int = 0
) -> Iterator[DrawnDigit]:
    """Redraw `count` MNIST digits (picked with `seed`) as canvas drawings, styles in turn.

    A generator: a canvas is 300 KB, so the set is drawn one at a time, never held whole.
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=min(count, len(images)), replace=False)
    for i, index in enumerate(picks):
        style = DRAWN_STYLES[i % len(DRAWN_STYLES)]
        yield draw_on_canvas(images[index].numpy(), int(labels[index]), style, rng)


def draw_on_canvas(
    digit: np.ndarray, label: int, style: str, rng: np.random.Generator
) -> DrawnDigit:
    """Redraw one 28x28 MNIST digit on a 280x280 canvas with a solid brush."""
    size = int(rng.integers(*{"small": (40, 80), "large": (200, 250)}.get(style, (90, 200))))
    # Brush width relative to the digit: what a person gets by drawing that large with the
    # app's brush. Wider than ~30% of the digit, strokes merge into blobs nobody can read.
    relative = {"thick brush": (0.18, 0.3), "thin brush": (0.03, 0.07)}.get(style, (0.07, 0.2))
    brush = max(2, round(size * rng.uniform(*relative)))
    ink = _solid_strokes(digit, size, brush)
    ink = ink[:CANVAS_SIZE, :CANVAS_SIZE]

    if style == "off-centre":
        corner = int(rng.integers(0, 4))
        top = CANVAS_SIZE - ink.shape[0] if corner >= 2 else 0
        left = CANVAS_SIZE - ink.shape[1] if corner % 2 else 0
        canvas = _on_canvas(ink, top, left)
    else:
        canvas = _anywhere_on_canvas(ink, rng)

    if style == "dark on light":
        image = ((1 - canvas) * 255).round().astype(np.uint8)
    elif style == "coloured ink":
        colour = np.array([230, 40, 60], dtype=np.float32)
        background = np.array([250, 248, 240], dtype=np.float32)
        mix = canvas[:, :, None]
        image = (mix * colour + (1 - mix) * background).round().astype(np.uint8)
    elif style == "transparent":
        image = np.zeros((CANVAS_SIZE, CANVAS_SIZE, 4), dtype=np.uint8)
        image[:, :, :3] = (40, 40, 200)
        image[:, :, 3] = (canvas * 255).round().astype(np.uint8)
    else:
        image = _app_canvas_image(canvas)
    return DrawnDigit(image=image, label=label, style=style)


def _anywhere_on_canvas(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`ink` pasted at a random place where it fits whole."""
    top = int(rng.integers(0, CANVAS_SIZE - ink.shape[0] + 1))
    left = int(rng.integers(0, CANVAS_SIZE - ink.shape[1] + 1))
    return _on_canvas(ink, top, left)


def _on_canvas(ink: np.ndarray, top: int, left: int) -> np.ndarray:
    """An empty canvas's ink map (0 = background, 1 = ink) with `ink` pasted at top, left."""
    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE), dtype=np.float32)
    canvas[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return canvas


def _app_canvas_image(canvas: np.ndarray) -> np.ndarray:
    """An ink map as the app's canvas sends it: opaque RGBA, white ink on black."""
    grey = (canvas * 255).round().astype(np.uint8)
    return np.dstack([grey, grey, grey, np.full_like(grey, 255)])


def _solid_strokes(digit: np.ndarray, size: int, brush: int) -> np.ndarray:
    """Scale the digit so its longer side is `size` px, and make its strokes a solid brush at
    least `brush` px wide with anti-aliased edges, as a canvas draws them."""
    mask = digit > 0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = size / max(crop.shape)
    shape = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    big = Image.fromarray(crop).resize(shape, Image.Resampling.BICUBIC)
    strokes = torch.from_numpy(np.asarray(big) > 100).float()[None, None]
    eroded = -F.max_pool2d(-strokes, 3, stride=1, padding=1)
    boundary = float((strokes - eroded).sum())
    width = 2 * float(strokes.sum()) / max(boundary, 1.0)
    radius = max(0, round((brush - width) / 2))
    if radius:
        strokes = F.pad(strokes, (radius,) * 4)
        strokes = F.max_pool2d(strokes, 2 * radius + 1, stride=1, padding=radius)
    return F.avg_pool2d(strokes, 3, stride=1, padding=1)[0, 0].numpy()


def pen_digits(
    images: torch.Tensor, labels: torch.Tensor, count: int = 2000, seed: int = 0
) -> Iterator[DrawnDigit]:
    """Trace `count` MNIST digits (picked with `seed`) as pen strokes on the canvas, one at a
    time: the digit's skeleton drawn with a round brush, white on black like the app's canvas."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=min(count, len(images)), replace=False)
    for index in picks:
        size = int(rng.integers(*PEN_DIGIT_SIZES))
        brush = int(rng.integers(*PEN_BRUSH_WIDTHS))
        ink = _pen_strokes(images[index].numpy(), size, brush)[:CANVAS_SIZE, :CANVAS_SIZE]
        image = _app_canvas_image(_anywhere_on_canvas(ink, rng))
        yield DrawnDigit(image=image, label=int(labels[index]), style="pen")


def _pen_strokes(digit: np.ndarray, size: int, brush: int) -> np.ndarray:
    """Redraw a 28x28 digit's skeleton with a round `brush` so its longer side is about `size`
    px; anti-aliased by drawing at twice the size and averaging down."""
    upscaled = Image.fromarray(digit).resize((56, 56), Image.Resampling.BICUBIC)
    ys, xs = np.nonzero(skeleton(np.asarray(upscaled) > 100))
    top, left = ys.min(), xs.min()
    scale = (size - brush) / max(ys.max() - top, xs.max() - left, 1)
    height = int((ys.max() - top) * scale + brush) + 2
    width = int((xs.max() - left) * scale + brush) + 2
    pen = ImageDraw.Draw(image := Image.new("L", (2 * width, 2 * height)))

    def at(y: int, x: int) -> tuple[float, float]:
        return 2 * ((x - left) * scale + brush / 2 + 1), 2 * ((y - top) * scale + brush / 2 + 1)

    points = set(zip(ys.tolist(), xs.tolist(), strict=True))
    for y, x in points:
        cx, cy = at(y, x)
        pen.ellipse([cx - brush, cy - brush, cx + brush, cy + brush], fill=255)
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            if (y + dy, x + dx) in points:
                pen.line([at(y, x), at(y + dy, x + dx)], fill=255, width=2 * brush)
    return np.asarray(image.resize((width, height), Image.Resampling.BOX)) / np.float32(255)


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Thin a boolean image to one-pixel-wide lines (Zhang and Suen, 1984)."""
    image = np.pad(mask.astype(np.uint8), 1)
    changed = True
    while changed:
        changed = False
        for second_pass in (False, True):
            p = image
            # The 8 neighbours clockwise from north: P2 .. P9 in the paper.
            n = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:],
                 p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]  # fmt: skip
            count = sum(neighbour.astype(np.int8) for neighbour in n)
            transitions = sum((n[i] == 0) & (n[(i + 1) % 8] == 1) for i in range(8))
            if second_pass:
                open_side = (n[0] * n[2] * n[6] == 0) & (n[0] * n[4] * n[6] == 0)
            else:
                open_side = (n[0] * n[2] * n[4] == 0) & (n[2] * n[4] * n[6] == 0)
            remove = (p[1:-1, 1:-1] == 1) & (count >= 2) & (count <= 6) & (transitions == 1)
            remove &= open_side
            if remove.any():
                image[1:-1, 1:-1][remove] = 0
                changed = True
    return image[1:-1, 1:-1].astype(bool)


def _arc(
    centre: tuple[float, float], radii: tuple[float, float], degrees: tuple[float, float]
) -> list[tuple[float, float]]:
    """Points along an elliptic arc, clockwise on screen from `degrees[0]` to `degrees[1]`."""
    steps = max(2, round(abs(degrees[1] - degrees[0]) / 15) + 1)
    return [
        (centre[0] + radii[0] * math.cos(angle), centre[1] + radii[1] * math.sin(angle))
        for angle in np.radians(np.linspace(*degrees, steps))
    ]


# How people write each digit: strokes (pen down to pen up) as points in a unit box, x to the
# right and y down. Several are rare in MNIST, whose writers were American.
Stroke = list[tuple[float, float]]
# fmt: off
WRITING_STYLES: dict[str, tuple[int, list[Stroke]]] = {
    "0 oval": (0, [_arc((0.5, 0.5), (0.45, 0.5), (-90, 270))]),
    "0 slashed": (0, [_arc((0.5, 0.5), (0.45, 0.5), (-90, 270)), [(0.9, 0.1), (0.1, 0.9)]]),
    "1 bar": (1, [[(0.5, 0.0), (0.5, 1.0)]]),
    "1 flag": (1, [[(0.2, 0.3), (0.55, 0.0), (0.55, 1.0)]]),
    "1 flag and base": (1, [[(0.2, 0.3), (0.55, 0.0), (0.55, 1.0)], [(0.2, 1.0), (0.9, 1.0)]]),
    "2 plain": (2, [[*_arc((0.5, 0.28), (0.4, 0.28), (180, 360)), (0.75, 0.55), (0.05, 1.0),
                     (0.95, 1.0)]]),
    "2 looped": (2, [[*_arc((0.5, 0.28), (0.4, 0.28), (180, 360)), (0.75, 0.55), (0.05, 1.0),
                      (0.2, 0.85), (0.35, 0.97), (0.95, 1.0)]]),
    "3 round": (3, [[*_arc((0.45, 0.25), (0.4, 0.25), (200, 450)),
                     *_arc((0.45, 0.75), (0.45, 0.25), (-90, 160))]]),
    "3 flat top": (3, [[(0.1, 0.0), (0.9, 0.0), (0.4, 0.4),
                        *_arc((0.45, 0.7), (0.45, 0.3), (-90, 150))]]),
    "4 closed": (4, [[(0.75, 1.0), (0.75, 0.0), (0.0, 0.65), (1.0, 0.65)]]),
    "4 open": (4, [[(0.15, 0.0), (0.1, 0.6), (0.95, 0.6)], [(0.7, 0.1), (0.7, 1.0)]]),
    "5 one stroke": (5, [[(0.9, 0.0), (0.2, 0.0), (0.15, 0.45),
                          *_arc((0.47, 0.7), (0.42, 0.3), (-120, 150))]]),
    "5 top bar apart": (5, [[(0.2, 0.0), (0.15, 0.45),
                             *_arc((0.47, 0.7), (0.42, 0.3), (-120, 150))],
                            [(0.2, 0.0), (0.9, 0.0)]]),
    "6 round": (6, [[*_arc((0.6, 0.45), (0.45, 0.45), (-100, -180)),
                     *_arc((0.5, 0.72), (0.42, 0.28), (180, 540))]]),
    "7 plain": (7, [[(0.05, 0.0), (0.95, 0.0), (0.4, 1.0)]]),
    "7 crossed": (7, [[(0.05, 0.0), (0.95, 0.0), (0.4, 1.0)], [(0.3, 0.5), (0.9, 0.5)]]),
    "7 hooked": (7, [[(0.05, 0.15), (0.05, 0.0), (0.95, 0.0), (0.4, 1.0)]]),
    "8 one stroke": (8, [[*_arc((0.5, 0.25), (0.35, 0.25), (90, 450)),
                          *_arc((0.5, 0.75), (0.45, 0.25), (-90, 270))]]),
    "8 two loops": (8, [_arc((0.5, 0.24), (0.33, 0.24), (-90, 270)),
                        _arc((0.5, 0.74), (0.45, 0.26), (-90, 270))]),
    "9 straight": (9, [_arc((0.45, 0.27), (0.4, 0.27), (0, 360)), [(0.85, 0.27), (0.85, 1.0)]]),
    "9 curved": (9, [_arc((0.45, 0.27), (0.4, 0.27), (0, 360)),
                     [(0.85, 0.27), (0.8, 0.8), (0.5, 1.0)]]),
}
# fmt: on


def styled_digits(count: int = 2000, seed: int = 0) -> Iterator[DrawnDigit]:
    """Draw `count` digits from `WRITING_STYLES` in turn, each bent, slanted, sized and placed
    its own way, as white pen strokes of the app's brush on the app's black canvas."""
    rng = np.random.default_rng(seed)
    names = list(WRITING_STYLES)
    for i in range(count):
        name = names[i % len(names)]
        label, strokes = WRITING_STYLES[name]
        ink, lines = _by_hand(strokes, rng)
        image = _app_canvas_image(_anywhere_on_canvas(ink, rng))
        # The hand's strokes as a mouse samples them: a point every few pixels along each one.
        sampled = [utils.resample(line, spacing=MOUSE_STEP_PX) for line in lines]
        yield DrawnDigit(image=image, label=label, style=name, strokes=sampled)


def _by_hand(
    strokes: list[Stroke], rng: np.random.Generator, brush: int = BRUSH_WIDTH
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One hand's version of a template: bent by a smooth random warp, each stroke put down a
    little off, the whole slanted, then drawn 110-240 px tall with a round brush, anti-aliased
    by drawing at twice the size. The ink, and the strokes drawn (px, y down)."""
    height = rng.uniform(110, 240)
    width = height * rng.uniform(0.55, 0.8)
    slant = rng.uniform(-0.15, 0.35)
    # The warp: two waves across the box, each moving points by up to 4% of the digit's size.
    frequencies = rng.uniform(-2 * math.pi, 2 * math.pi, (2, 2, 2))
    phases = rng.uniform(0, 2 * math.pi, (2, 2))
    amplitudes = rng.uniform(-0.04, 0.04, (2, 2))
    lines = []
    for stroke in strokes:
        points = np.asarray(stroke)
        waves = np.sin(np.einsum("pd,wcd->pwc", points, frequencies) + phases)
        points = points + (amplitudes * waves).sum(axis=1) + rng.normal(0, 0.015, 2)
        xs = points[:, 0] * width + (1 - points[:, 1]) * slant * height
        lines.append(np.stack([xs, points[:, 1] * height], axis=1))
    everything = np.concatenate(lines)
    origin = everything.min(axis=0) - brush / 2 - 1
    size = np.ceil(everything.max(axis=0) - origin + brush / 2 + 1).astype(int)
    pen = ImageDraw.Draw(image := Image.new("L", tuple(2 * size)))
    for line in lines:
        points = [tuple(point) for point in 2 * (line - origin)]
        pen.line(points, fill=255, width=2 * brush, joint="curve")
        for x, y in (points[0], points[-1]):
            pen.ellipse([x - brush, y - brush, x + brush, y + brush], fill=255)
    ink = np.asarray(image.resize(tuple(size), Image.Resampling.BOX)) / np.float32(255)
    return ink[:CANVAS_SIZE, :CANVAS_SIZE], lines


def accuracy(predicted: Sequence[int | None], labels: Sequence[int]) -> float:
    """Fraction right; an image seen as empty counts as wrong."""
    return metrics.accuracy_report(predicted, list(labels))["accuracy"]


def calibration_error(found: Sequence[model_lib.Prediction | None], labels: Sequence[int]) -> float:
    """Expected calibration error (15 bins) of what the app showed: an image seen as empty
    shows no confidence (0) and counts as wrong."""
    return metrics.expected_calibration_error(
        [p.confidence if p else 0.0 for p in found],
        [p is not None and p.digit == label for p, label in zip(found, labels, strict=True)],
    )


def accuracy_by_style(
    predicted: Sequence[int | None], labels: Sequence[int], styles: Sequence[str]
) -> dict[str, float]:
    """Accuracy of each style, in the order the styles first appear."""
    by_style: dict[str, tuple[list[int | None], list[int]]] = {}
    for digit, label, style in zip(predicted, labels, styles, strict=True):
        picked, truths = by_style.setdefault(style, ([], []))
        picked.append(digit)
        truths.append(label)
    return {style: accuracy(*pairs) for style, pairs in by_style.items()}


def evaluate(
    net: torch.nn.Module,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    drawn_count: int = 2000,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> dict:
    """MNIST test accuracy, drawn-digit accuracy (overall and per style), pen-digit accuracy and
    writing-styles accuracy, all through `utils.preprocess`."""
    started = time.perf_counter()
    test_found = metrics.predictions(net, (image.numpy() for image in test_images))
    test_accuracy = accuracy([p and p.digit for p in test_found], test_labels.tolist())
    drawn_labels, drawn_styles, drawn_found = _predict_drawings(
        net, drawn_digits(test_images, test_labels, count=drawn_count, seed=seed)
    )
    drawn_predicted = [p and p.digit for p in drawn_found]
    drawn_accuracy = accuracy(drawn_predicted, drawn_labels)
    by_style = accuracy_by_style(drawn_predicted, drawn_labels, drawn_styles)
    pen_labels, _, pen_found = _predict_drawings(
        net, pen_digits(test_images, test_labels, count=drawn_count, seed=seed)
    )
    pen_accuracy = accuracy([p and p.digit for p in pen_found], pen_labels)
    styles_labels, writing_styles, styles_found = _predict_drawings(
        net, styled_digits(count=drawn_count, seed=seed)
    )
    styles_predicted = [p and p.digit for p in styles_found]
    styles_accuracy = accuracy(styles_predicted, styles_labels)
    ece = {
        "test_ece": calibration_error(test_found, test_labels.tolist()),
        "drawn_ece": calibration_error(drawn_found, drawn_labels),
        "pen_ece": calibration_error(pen_found, pen_labels),
        "styles_ece": calibration_error(styles_found, styles_labels),
    }
    log(
        f"test accuracy {test_accuracy:.2%} on {len(test_labels)} MNIST test images; "
        f"drawn-digit accuracy {drawn_accuracy:.2%} on {len(drawn_labels)} canvas drawings; "
        f"pen-digit accuracy {pen_accuracy:.2%} on {len(pen_labels)} pen tracings; "
        f"writing-styles accuracy {styles_accuracy:.2%} on {len(styles_labels)} pen drawings "
        f"({time.perf_counter() - started:.1f} s)"
    )
    log(
        "  expected calibration error (15 bins): "
        + ", ".join(f"{name.removesuffix('_ece')} {value:.2%}" for name, value in ece.items())
    )
    log("  drawn by style: " + ", ".join(f"{s} {a:.1%}" for s, a in by_style.items()))
    by_writing = accuracy_by_style(styles_predicted, styles_labels, writing_styles)
    hardest = sorted(by_writing.items(), key=lambda item: item[1])[:3]
    log("  hardest writing styles: " + ", ".join(f"{s} {a:.1%}" for s, a in hardest))
    return {
        "test_accuracy": test_accuracy,
        "drawn_accuracy": drawn_accuracy,
        "drawn_accuracy_by_style": by_style,
        "pen_accuracy": pen_accuracy,
        "styles_accuracy": styles_accuracy,
        **ece,
    }


def _predict_drawings(
    net: torch.nn.Module, drawings: Iterable[DrawnDigit]
) -> tuple[list[int], list[str], list[model_lib.Prediction | None]]:
    """Labels, styles and predictions of a stream of drawings, held one at a time."""
    labels: list[int] = []
    styles: list[str] = []

    def read() -> Iterator[tuple[np.ndarray, list[np.ndarray] | None]]:
        for drawn in drawings:
            labels.append(drawn.label)
            styles.append(drawn.style)
            yield drawn.image, drawn.strokes

    found = metrics.read_drawings(net, read())
    return labels, styles, found


def pen_writers_report(
    net: torch.nn.Module, pen_file: str, writers: Sequence[int], seed: int
) -> dict:
    """The model on the pen digits of `writers`, drawn as train.py drew them for its own
    measurement (one rendering each, the app's brush, `seed`), read as the app reads a drawing:
    the image through `utils.preprocess`, the strokes through `utils.trajectory`. With the
    model of the strokes, also the image alone (`image_alone`)."""
    _, held_out = pendigits.split_writers(pendigits.load(pen_file), writers)
    pixels, labels = pendigits.render_for_training(held_out, 1, seed=seed, vary=False)
    images = utils.normalize(pixels)[:, None]
    held_out_trajectories = sources.trajectories([digit.strokes for digit in held_out], y_up=True)

    def report(trajectories: torch.Tensor | None) -> dict:
        found = model_lib.predict_batch(net, images, trajectories)
        return metrics.accuracy_report(
            [p.digit for p in found], labels.tolist(), [p.confidence for p in found]
        )

    both = report(held_out_trajectories)
    if getattr(net, "trajectory", None) is None:
        return {"writers": list(writers), **both}
    alone = report(None)
    with torch.inference_mode():
        strokes = [int(d) for d in net.trajectory(held_out_trajectories).argmax(1)]
    pair = [p.digit for p in model_lib.predict_batch(net, images, held_out_trajectories)]
    image = [p.digit for p in model_lib.predict_batch(net, images, None)]
    truth = labels.tolist()
    by_writer = {
        str(writer): {
            "digits": len(mine := [i for i, d in enumerate(held_out) if d.writer == writer]),
            **{
                name: sum(found[i] != truth[i] for i in mine)
                for name, found in (("image", image), ("strokes", strokes), ("pair", pair))
            },
        }
        for writer in writers
    }
    return {
        "writers": list(writers),
        **both,
        "image_alone": {key: alone[key] for key in ("accuracy", "ece", "by_digit")},
        "errors_by_writer": by_writer,
    }


def save_examples(images: torch.Tensor, labels: torch.Tensor, path: str) -> None:
    """Write two rows of eight drawn digits, one of pen digits and one of writing styles as a
    PNG, to look at."""
    tiles = []
    examples = [
        *drawn_digits(images, labels, count=16),
        *pen_digits(images, labels, count=8),
        *styled_digits(count=8, seed=1),
    ]
    for drawn in examples:
        tile = Image.fromarray(drawn.image)
        if drawn.style == "transparent":
            tile = Image.alpha_composite(Image.new("RGBA", tile.size, "white"), tile)
        tiles.append(np.asarray(tile.convert("RGB")))
    rows = [np.hstack(tiles[start : start + 8]) for start in range(0, len(tiles), 8)]
    Image.fromarray(np.vstack(rows)).save(path)


def simulate_people(args: argparse.Namespace) -> None:
    """The feedback loop with simulated people (see the module's docstring)."""
    import learner
    from lab import people  # needs PostgreSQL's binaries (pgserver): only here
    from registry import store

    shipped_path = model_lib.model_path() if args.model is None else Path(args.model)
    shipped = model_lib.load_model(shipped_path)
    name = f"{shipped_path.name}@{hashlib.sha256(shipped_path.read_bytes()).hexdigest()[:12]}"
    pen_file = args.pen_file or pendigits.default_path()
    data_dir = args.data_dir or mnist.data_dir_from_env()
    people_writers = [int(w) for w in args.people_writers.split(",")]
    others = [w for w in pendigits.HELD_OUT_WRITERS if w not in people_writers]
    _, held_out = pendigits.split_writers(pendigits.load(pen_file), pendigits.HELD_OUT_WRITERS)
    pools, tests = {}, {"people": [], "others": []}
    for writer in pendigits.HELD_OUT_WRITERS:
        digits = [d for d in held_out if d.writer == writer]
        if writer in people_writers:  # the first half answered (again and again), the rest tests
            pools[writer] = digits[: len(digits) // 2]
            tests["people"] += digits[len(digits) // 2 :]
        else:
            tests["others"] += digits
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="simulate-people-"))
    print(
        f"{len(people_writers)} people (pen writers {args.people_writers}) give {args.answers} "
        f"answers each with {name}, drawn from the first half of their digits (a digit "
        f"answered again is written and placed anew); test: their other "
        f"{len(tests['people'])} digits, the {len(tests['others'])} digits of writers "
        f"{','.join(map(str, others))}, MNIST's test set; work folder {work}"
    )
    # Each test digit drawn once with the app's brush, as train.py measures held-out writers,
    # and read with its strokes, as the app reads a drawing.
    sets = {
        key: pendigits.render_for_training(digits, 1, seed=1, vary=False)
        for key, digits in tests.items()
    }
    trajectories = {
        key: sources.trajectories([digit.strokes for digit in digits], y_up=True)
        for key, digits in tests.items()
    }
    test_images, test_labels = mnist.load_split(data_dir, "test")
    pixels = [utils.to_pixels(utils.preprocess(image.numpy())) for image in test_images]
    sets["mnist"] = (torch.from_numpy(np.stack(pixels)), test_labels)  # as the app reads it
    live = work / "live" / "model.pth"  # the app's model file: the registry's first version
    live.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped_path, live)
    if shipped_path.with_suffix(".json").is_file():
        shutil.copyfile(shipped_path.with_suffix(".json"), live.with_suffix(".json"))
    with people.throwaway_database() as server:
        stored = answer_as_people(server.url, pools, args.answers, shipped, name)
        wrong = sum(a.predicted != a.label for a in stored)
        print(f"stored {len(stored)} answers; the shipped model read {wrong} of them wrong")
        # The loop's own command: the learner's attempt (learner.py: train.py with its recipe,
        # then the promotion rule), due at once.
        os.environ.update(
            LEARN_MIN_ANSWERS="1",
            LEARN_EVERY="0",
            LEARN_TRAIN_ARGS=shlex.join(["--data-dir", str(data_dir), "--pen-file", str(pen_file)])
            + " "
            + args.train_args,
        )
        print(f"$ learner: train.py {' '.join(learner.RECIPE)} {os.environ['LEARN_TRAIN_ARGS']}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        attempt_id, state = learner.check(server.url, work / "learner", live)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        with server.connect() as conn:
            candidate, report, message = conn.execute(
                "SELECT candidate, report, message FROM learning_attempts WHERE id = %s",
                (attempt_id,),
            ).fetchone()
            weights, _ = store.weights_of(conn, candidate) if candidate else (None, None)
        if weights is None:
            raise SystemExit(f"the attempt {state}: {message}")
        promoted = state == "promoted"
        print(
            f"  attempt {state} in {time.perf_counter() - started:.0f} s wall, {cpu:.0f} s CPU"
            f" ({message})\n{report.get('table', '')}"
        )
    candidate_net = store.load_weights(weights, f"candidate {candidate[:12]}")
    models = {
        "shipped": shipped,
        "candidate": candidate_net,
        f"new live ({'promoted' if promoted else 'refused: shipped'})": model_lib.load_model(live),
    }
    titles = {
        "people": f"people's other digits (writers {args.people_writers})",
        "others": f"other held-out writers ({','.join(map(str, others))})",
        "mnist": "MNIST test",
    }
    print(f"\n| set | {' | '.join(models)} |\n|---|" + "---|" * len(models))
    for key, (images, labels) in sets.items():
        cells, baseline = [], None
        known = trajectories.get(key)
        for net in models.values():
            predicted = torch.tensor(
                [
                    found.digit
                    for i in range(0, len(images), 1000)
                    for found in model_lib.predict_batch(
                        net,
                        utils.normalize(images[i : i + 1000])[:, None],
                        None if known is None else known[i : i + 1000],
                    )
                ]
            )
            errors = int((predicted != labels).sum())
            baseline = errors if baseline is None else baseline
            change = f", {(errors - baseline) / max(baseline, 1):+.0%}" if cells else ""
            cells.append(f"{errors} errors ({1 - errors / len(labels):.2%}{change})")
        print(f"| {titles[key]}, {len(labels)} digits | {' | '.join(cells)} |")


def answer_as_people(
    conninfo: str,
    pools: dict[int, list[pendigits.PenDigit]],
    answers: int,
    net: torch.nn.Module,
    model_name: str,
) -> list:
    """`answers` answers of each writer of `pools`, stored as the app stores them
    (lab/people.py), in turns: its pool's digits in order, the first time as written
    (`pendigits.on_canvas` without variation, as people.answer_all), then again and again, each
    time written and placed anew (`pendigits.vary_strokes`, `on_canvas` with variation)."""
    from lab import people

    db.configure(conninfo)
    stored = []
    try:
        for turn in range(answers):
            for writer, pool in pools.items():
                digit = pool[turn % len(pool)]
                again = turn // len(pool)
                rng = np.random.default_rng((writer, turn))
                strokes = digit.strokes
                if again:
                    strokes = pendigits.vary_strokes(strokes, digit.label, rng)
                placed, brush = pendigits.on_canvas(strokes, rng, vary=bool(again))
                submission = people.submission_id(digit, again, turn)
                stored.append(
                    people.store_answer(placed, brush, digit.label, net, model_name, submission)
                )
    finally:
        db.configure(None)
    return stored


def explain_writers(net: model_lib.DigitCNN, args: argparse.Namespace) -> None:
    """The deletion test (lab/explanations.py) on the held-out pen writers' digits, read by the
    model as the app serves it, one thread as in the app."""
    from lab import explanations

    torch.set_num_threads(1)
    pen_file = args.pen_file or pendigits.default_path()
    _, digits = pendigits.split_writers(pendigits.load(pen_file), pendigits.HELD_OUT_WRITERS)
    report = explanations.deletion_report(model_lib.Compiled(net), digits[: args.limit])
    explanations.print_report(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model file (default models/model.pth)")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default MNIST_DIR)")
    parser.add_argument("--drawn", type=int, default=2000, help="size of each drawn set")
    parser.add_argument("--seed", type=int, default=0, help="which digits and drawings")
    parser.add_argument("--save-examples", default=None, help="write a PNG grid of drawings")
    parser.add_argument(
        "--pen-file", default=None, help="pen digits file (default: PENDIGITS_DIR's, as train.py)"
    )
    parser.add_argument(
        "--write", action="store_true", help="add these figures to the model's model.json"
    )
    parser.add_argument(
        "--simulate-people", action="store_true", help="the feedback loop (see above) instead"
    )
    parser.add_argument(
        "--explanations",
        action="store_true",
        help="the deletion test of the Draw page's explanations instead (lab/explanations.py)",
    )
    parser.add_argument("--limit", type=int, default=None, help="with --explanations: N digits")
    parser.add_argument("--people-writers", default="3,14,25", help="held-out writers who answer")
    parser.add_argument("--answers", type=int, default=30, help="answers per person")
    parser.add_argument("--train-args", default="", help="more train.py flags, one string")
    parser.add_argument("--work-dir", default=None, help="candidates and renderings (kept)")
    args = parser.parse_args()
    if args.simulate_people:
        torch.set_grad_enabled(False)
        simulate_people(args)
        return
    path = model_lib.model_path() if args.model is None else Path(args.model)
    net = model_lib.load_model(path)
    if args.explanations:
        explain_writers(net, args)
        return
    images, labels = mnist.load_split(args.data_dir or mnist.data_dir_from_env(), "test")
    if args.save_examples:
        save_examples(images, labels, args.save_examples)
    report = evaluate(net, images, labels, drawn_count=args.drawn, seed=args.seed)
    info_path = path.with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    writers = info.get("pen_held_out", {}).get("writers", pendigits.HELD_OUT_WRITERS)
    if writers:
        pen = pen_writers_report(
            net, args.pen_file or pendigits.default_path(), writers, seed=info.get("seed", 1)
        )
        print(
            f"pen digits, writers not trained on ({','.join(map(str, writers))}): "
            f"{pen['accuracy']:.2%} of {pen['count']}, expected calibration error "
            f"{pen['ece']:.2%}"
        )
        print("  by digit: " + ", ".join(f"{d} {a:.1%}" for d, a in pen["by_digit"].items()))
        confusions = ", ".join(f"{c} x{n}" for c, n in pen["confusions"].items())
        print(f"  worst confusions: {confusions}")
        if by_writer := pen.get("errors_by_writer"):
            print("  errors per writer: | writer | digits | image alone | strokes alone | pair |")
            for writer, row in by_writer.items():
                print(
                    f"  | {writer} | {row['digits']} | {row['image']} | {row['strokes']} |"
                    f" {row['pair']} |"
                )
        if alone := pen.get("image_alone"):
            print(
                f"  the image alone (the CNN, strokes unknown): {alone['accuracy']:.2%}, "
                f"expected calibration error {alone['ece']:.2%}; by digit "
                + ", ".join(f"{d} {a:.1%}" for d, a in alone["by_digit"].items())
            )
    else:
        print("pen digits: the model was trained on every writer; none to measure it on")
    if args.write:
        lab = {
            key: round(value, 5) if isinstance(value, float) else value
            for key, value in report.items()
            if key != "test_accuracy"
        }
        info.update({"evaluate": {"seed": args.seed, "drawn_count": args.drawn, **lab}})
        if writers and "pen_held_out" in info:  # a model.json from before train.py wrote it
            info["pen_held_out"]["ece"] = pen["ece"]
        atomic_write_text(json.dumps(info, indent=2) + "\n", info_path)
        print(f"figures written to {info_path}")


if __name__ == "__main__":
    main()
