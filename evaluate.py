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
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    strokes = torch.from_numpy(np.asarray(big) > 100).float()[None, None]
    eroded = -F.max_pool2d(-strokes, 3, stride=1, padding=1)
    boundary = float((strokes - eroded).sum())
    width = 2 * float(strokes.sum()) / max(boundary, 1.0)
    radius = max(0, round((brush - width) / 2))
    if radius:
        strokes = F.pad(strokes, (radius,) * 4)
        strokes = F.max_pool2d(strokes, 2 * radius + 1, stride=1, padding=radius)
    return F.avg_pool2d(strokes, 3, stride=1, padding=1)[0, 0].numpy()


def predicted_digits(
    net: torch.nn.Module, images: Iterable[np.ndarray], batch_size: int = 500
) -> list[int | None]:
    """The digit the app would show for each raw image (None where `preprocess` sees no digit):
    each image through `utils.preprocess`, then `predict_batch` in batches."""
    digits: list[int | None] = []
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        predictions = model_lib.predict_batch(net, torch.cat([batch for _, batch in pending]))
        for (position, _), prediction in zip(pending, predictions, strict=True):
            digits[position] = prediction.digit
        pending.clear()

    for image in images:
        digits.append(None)
        try:
            pending.append((len(digits) - 1, utils.preprocess(image)))
        except utils.EmptyImageError:
            continue
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return digits


def accuracy(predicted: Sequence[int | None], labels: Sequence[int]) -> float:
    """Fraction right; an image seen as empty counts as wrong."""
    return sum(p == t for p, t in zip(predicted, labels, strict=True)) / max(1, len(labels))


def evaluate(
    net: torch.nn.Module,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    drawn_count: int = 2000,
    log: Callable[[str], None] = print,
) -> dict:
    """MNIST test accuracy and drawn-digit accuracy (overall and per style), both through
    `utils.preprocess`."""
    started = time.perf_counter()
    test_accuracy = accuracy(
        predicted_digits(net, (image.numpy() for image in test_images)), test_labels.tolist()
    )
    labels, styles = [], []

    def drawings() -> Iterator[np.ndarray]:
        for drawn in drawn_digits(test_images, test_labels, count=drawn_count):
            labels.append(drawn.label)
            styles.append(drawn.style)
            yield drawn.image

    drawn_predicted = predicted_digits(net, drawings())
    drawn_accuracy = accuracy(drawn_predicted, labels)
    by_style = {}
    for style in DRAWN_STYLES:
        picked = [i for i, s in enumerate(styles) if s == style]
        by_style[style] = accuracy(
            [drawn_predicted[i] for i in picked], [labels[i] for i in picked]
        )
    log(
        f"test accuracy {test_accuracy:.2%} on {len(test_labels)} MNIST test images; "
        f"drawn-digit accuracy {drawn_accuracy:.2%} on {len(labels)} canvas drawings "
        f"({time.perf_counter() - started:.1f} s)"
    )
    log("  by style: " + ", ".join(f"{s} {a:.1%}" for s, a in by_style.items()))
    return {
        "test_accuracy": test_accuracy,
        "drawn_accuracy": drawn_accuracy,
        "drawn_accuracy_by_style": by_style,
    }


def save_examples(images: torch.Tensor, labels: torch.Tensor, path: str) -> None:
    """Write two rows of eight drawn digits as one PNG, to look at what the set holds."""
    tiles = []
    for drawn in drawn_digits(images, labels, count=16):
        tile = Image.fromarray(drawn.image)
        if drawn.style == "transparent":
            tile = Image.alpha_composite(Image.new("RGBA", tile.size, "white"), tile)
        tiles.append(np.asarray(tile.convert("RGB")))
    Image.fromarray(np.vstack([np.hstack(tiles[:8]), np.hstack(tiles[8:])])).save(path)


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
        save_examples(images, labels, args.save_examples)
    evaluate(net, images, labels, drawn_count=args.drawn)


if __name__ == "__main__":
    main()
