"""Measure a model the way the app uses it: raw images through `utils.preprocess`, then `predict`.

Besides MNIST's test set this builds a "drawn" set: MNIST test digits redrawn the way people draw
on the app's 280x280 canvas, with a solid brush of some width, small or large, anywhere on the
canvas, in either polarity, in colour, or on a transparent background. A model that only works
on MNIST's own framing fails here; one that works through `utils.preprocess` does not.

    python evaluate.py                 # the shipped model on MNIST test + the drawn set
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import mnist
import model as model_lib
import utils

CANVAS_SIZE = 280
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


def drawn_digits(
    images: torch.Tensor, labels: torch.Tensor, count: int = 2000, seed: int = 0
) -> list[DrawnDigit]:
    """Redraw `count` MNIST digits (picked with `seed`) as canvas drawings, styles in turn."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=min(count, len(images)), replace=False)
    return [
        draw_on_canvas(images[index].numpy(), int(labels[index]), DRAWN_STYLES[i % 8], rng)
        for i, index in enumerate(picks)
    ]


def draw_on_canvas(
    digit: np.ndarray, label: int, style: str, rng: np.random.Generator
) -> DrawnDigit:
    """Redraw one 28x28 MNIST digit on a 280x280 canvas with a solid brush."""
    size = {"small": (40, 80), "large": (200, 250)}.get(style, (90, 200))
    brush = {"thick brush": (22, 32), "thin brush": (5, 9)}.get(style, (10, 22))
    ink = _solid_strokes(digit, int(rng.integers(*size)), int(rng.integers(*brush)))
    ink = ink[:CANVAS_SIZE, :CANVAS_SIZE]

    h, w = ink.shape
    room_y, room_x = CANVAS_SIZE - h, CANVAS_SIZE - w
    if style == "off-centre":
        corner = int(rng.integers(0, 4))
        top = room_y if corner >= 2 else 0
        left = room_x if corner % 2 else 0
    else:
        top, left = int(rng.integers(0, room_y + 1)), int(rng.integers(0, room_x + 1))
    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE), dtype=np.float32)
    canvas[top : top + h, left : left + w] = ink

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
        grey = (canvas * 255).round().astype(np.uint8)
        image = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    return DrawnDigit(image=image, label=label, style=style)


def _solid_strokes(digit: np.ndarray, size: int, brush: int) -> np.ndarray:
    """Scale the digit so its longer side is `size` px, and make its strokes a solid brush at
    least `brush` px wide with anti-aliased edges, as a canvas draws them."""
    mask = digit > 0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = size / max(crop.shape)
    shape = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    big = Image.fromarray(crop).resize(shape, Image.Resampling.BICUBIC)
    strokes = torch.from_numpy(np.asarray(big) > 150).float()[None, None]
    eroded = -F.max_pool2d(-strokes, 3, stride=1, padding=1)
    boundary = float((strokes - eroded).sum())
    width = 2 * float(strokes.sum()) / max(boundary, 1.0)
    radius = max(0, round((brush - width) / 2))
    if radius:
        strokes = F.pad(strokes, (radius,) * 4)
        strokes = F.max_pool2d(strokes, 2 * radius + 1, stride=1, padding=radius)
    return F.avg_pool2d(strokes, 3, stride=1, padding=1)[0, 0].numpy()


def accuracy(
    net: torch.nn.Module,
    images: Iterable[np.ndarray],
    labels: Sequence[int],
    batch_size: int = 500,
) -> float:
    """Fraction right when each raw image goes through `utils.preprocess` and `predict_batch`.

    An image that `preprocess` rejects as empty counts as wrong.
    """
    inputs, kept_labels = [], []
    for image, label in zip(images, labels, strict=True):
        try:
            inputs.append(utils.preprocess(image))
            kept_labels.append(label)
        except utils.EmptyImageError:
            pass
    correct = 0
    for start in range(0, len(inputs), batch_size):
        predictions = model_lib.predict_batch(net, torch.cat(inputs[start : start + batch_size]))
        truth = kept_labels[start : start + batch_size]
        correct += sum(p.digit == t for p, t in zip(predictions, truth, strict=True))
    return correct / max(1, len(labels))


def evaluate(
    net: torch.nn.Module,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    drawn_count: int = 2000,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """MNIST test accuracy and drawn-digit accuracy, both through `utils.preprocess`."""
    started = time.perf_counter()
    test_accuracy = accuracy(net, (image.numpy() for image in test_images), test_labels.tolist())
    drawn = drawn_digits(test_images, test_labels, count=drawn_count)
    drawn_accuracy = accuracy(net, (d.image for d in drawn), [d.label for d in drawn])
    by_style = {
        style: accuracy(
            net,
            [d.image for d in drawn if d.style == style],
            [d.label for d in drawn if d.style == style],
        )
        for style in DRAWN_STYLES
    }
    log(
        f"test accuracy {test_accuracy:.2%} on {len(test_labels)} MNIST test images; "
        f"drawn-digit accuracy {drawn_accuracy:.2%} on {len(drawn)} canvas drawings "
        f"({time.perf_counter() - started:.1f} s)"
    )
    log("  by style: " + ", ".join(f"{s} {a:.1%}" for s, a in by_style.items()))
    return {
        "test_accuracy": test_accuracy,
        "drawn_accuracy": drawn_accuracy,
        "drawn_accuracy_by_style": by_style,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model file (default models/model.pth)")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default MNIST_DIR)")
    parser.add_argument("--drawn", type=int, default=2000, help="size of the drawn set")
    parser.add_argument("--save-examples", default=None, help="write a PNG grid of drawings")
    args = parser.parse_args()
    net = model_lib.load_model(args.model)
    images, labels = mnist.load_split(args.data_dir or mnist.data_dir_from_env(), "test")
    if args.save_examples:
        examples = drawn_digits(images, labels, count=16)
        grid = [d.image if d.image.ndim == 3 else np.dstack([d.image] * 3) for d in examples]
        rgb = [
            g[:, :, :3]
            if g.shape[2] == 4 and g[:, :, 3].min() == 255
            else np.dstack([g[:, :, 3]] * 3)
            if g.shape[2] == 4
            else g
            for g in grid
        ]
        rows = [np.hstack(rgb[i : i + 8]) for i in (0, 8)]
        Image.fromarray(np.vstack(rows).astype(np.uint8)).save(args.save_examples)
    evaluate(net, images, labels, drawn_count=args.drawn)


if __name__ == "__main__":
    main()
