"""Turn a drawing into what the model reads: the 28x28 image it was trained on, and its strokes
as the model of the strokes reads them (`trajectory`).

A canvas drawing is nothing like an MNIST digit until it is normalised the way MNIST was built:
the ink is cropped to its bounding box, scaled so its longest side is 20 px (keeping the aspect
ratio, anti-aliased), and placed in a 28x28 frame with its centre of mass in the middle. Resizing
the whole canvas instead is why small or off-centre digits are misread by naive apps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# The app's drawing canvas (px, square) and its brush width (px).
CANVAS_SIZE = 280
BRUSH_WIDTH = 18

FRAME_SIZE = 28
DIGIT_BOX = 20

# Ink below this fraction of full contrast is treated as background (anti-aliasing, noise).
INK_THRESHOLD = 0.2
# A colour closer than this to the background is no ink at all.
MIN_CONTRAST = 40 / 255
# Ink whose bounding box is smaller than this fraction of the image is a speck, not a digit.
MIN_DIGIT_FRACTION = 0.08


# A trajectory (`trajectory`): this many points along the ink, each with these features.
TRAJECTORY_POINTS = 64
TRAJECTORY_FEATURES = 5  # x, y, dx, dy, pen lift


class EmptyImageError(ValueError):
    """The image holds no digit: nothing drawn, or only a speck."""


class ImageFormatError(ValueError):
    """The input is not an image this module can read."""


def preprocess(image: np.ndarray | Image.Image) -> torch.Tensor:
    """Return the normalised model input, shape (1, 1, 28, 28), float32.

    Accepts a uint8 array of shape HxW, HxWx3 or HxWx4 (alpha respected), or a PIL image, of any
    size, with light ink on a dark background or dark ink on a light one.
    """
    return normalize(center_digit(ink_map(image)))[None, None]


def normalize(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Scale uint8 pixels (0 = background, 255 = ink) to the model's input range."""
    tensor = torch.as_tensor(pixels).float().div_(255.0)
    return tensor.sub_(MNIST_MEAN).div_(MNIST_STD)


def to_pixels(model_input: torch.Tensor) -> np.ndarray:
    """Undo `normalize`: the 28x28 uint8 image the model sees, for display."""
    image = model_input.detach().reshape(FRAME_SIZE, FRAME_SIZE) * MNIST_STD + MNIST_MEAN
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def ink_map(image: np.ndarray | Image.Image) -> np.ndarray:
    """Return a float32 HxW array in [0, 1]: how much ink each pixel holds.

    Ink is whatever differs from the background, in any colour: the background colour is the
    median of the image border, so white-on-black, black-on-white and coloured ink all work. With a
    transparent background (RGBA), the opaque pixels are the ink.
    """
    array = _as_array(image)
    if array.ndim == 2:
        array = array[:, :, None]
    colour = array[:, :, :3]

    if array.shape[2] == 4 and array[:, :, 3].min() < 255:
        alpha = array[:, :, 3]
        if _border(alpha).mean() < 128:
            return alpha / np.float32(255)
        colour = ((colour.astype(np.uint16) * alpha[:, :, None] + 127) // 255).astype(np.uint8)

    if colour.shape[2] == 3 and _is_grey(colour):
        colour = colour[:, :, :1]  # the app's white-on-black canvas: one channel says it all
    background = np.median(_border(colour), axis=0).round().astype(np.int16)
    # Per channel, |value - background| through a 256-entry table: much faster than int16 maths.
    values = np.arange(256, dtype=np.int16)
    contrast = None
    for channel in range(colour.shape[2]):
        table = np.abs(values - background[channel]).astype(np.uint8)
        distance = table[colour[:, :, channel]]
        contrast = distance if contrast is None else np.maximum(contrast, distance, out=contrast)
    return contrast / np.float32(255)


def center_digit(ink: np.ndarray) -> np.ndarray:
    """Crop, scale and centre an ink map as MNIST did; return a 28x28 uint8 array."""
    return place_digit(ink)[0]


@dataclass(frozen=True)
class Placement:
    """Where `center_digit` put the ink: the crop's top left corner in the image, the scale,
    and where the scaled crop's top left corner landed in the 28x28 frame."""

    top: int
    left: int
    scale: float
    frame_top: int
    frame_left: int

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        """Image coordinates (x, y), pixel edges at whole numbers, as frame coordinates."""
        points = np.asarray(points, dtype=np.float64)
        return np.stack(
            [
                (points[:, 0] - self.left) * self.scale + self.frame_left,
                (points[:, 1] - self.top) * self.scale + self.frame_top,
            ],
            axis=1,
        )


def place_digit(ink: np.ndarray) -> tuple[np.ndarray, Placement]:
    """`center_digit`'s 28x28 uint8 array, and where it put the ink (`Placement`)."""
    peak = float(ink.max()) if ink.size else 0.0
    if peak < MIN_CONTRAST:
        raise EmptyImageError("Nothing is drawn yet: draw a digit on the canvas.")
    ink = ink / peak

    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    longest = max(bottom - top, right - left)
    if longest < MIN_DIGIT_FRACTION * max(ink.shape) or (ink > INK_THRESHOLD).sum() < 2:
        raise EmptyImageError("That is only a dot: draw a whole digit, a bit larger.")

    digit = ink[top:bottom, left:right]
    scale = DIGIT_BOX / longest
    height = max(1, round(digit.shape[0] * scale))
    width = max(1, round(digit.shape[1] * scale))
    resized = Image.fromarray(digit.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    digit = np.clip(np.asarray(resized), 0.0, None)
    digit /= max(float(digit.max()), 1e-6)

    frame = np.zeros((FRAME_SIZE, FRAME_SIZE), dtype=np.float32)
    ys, xs = np.indices(digit.shape)
    mass = digit.sum()
    centre_y, centre_x = (ys * digit).sum() / mass, (xs * digit).sum() / mass
    frame_top = int(np.clip(round(FRAME_SIZE / 2 - centre_y), 0, FRAME_SIZE - height))
    frame_left = int(np.clip(round(FRAME_SIZE / 2 - centre_x), 0, FRAME_SIZE - width))
    frame[frame_top : frame_top + height, frame_left : frame_left + width] = digit
    placement = Placement(int(top), int(left), scale, frame_top, frame_left)
    return (frame * 255).round().astype(np.uint8), placement


def _as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        mode = "RGBA" if "A" in image.getbands() or image.mode == "P" else "RGB"
        return np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "F") else mode))
    if not isinstance(image, np.ndarray):
        kind = type(image).__name__
        raise ImageFormatError(f"Expected a numpy array or a PIL image, got {kind}.")
    if image.dtype != np.uint8:
        raise ImageFormatError(f"Expected uint8 pixels (0-255), got dtype {image.dtype}.")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise ImageFormatError(
            f"Expected an image of shape HxW, HxWx3 or HxWx4, got shape {image.shape}."
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise EmptyImageError("The image is empty (zero pixels).")
    return image


def _is_grey(colour: np.ndarray) -> bool:
    return np.array_equal(colour[:, :, 0], colour[:, :, 1]) and np.array_equal(
        colour[:, :, 1], colour[:, :, 2]
    )


def _border(array: np.ndarray) -> np.ndarray:
    """The pixels on the image's edge, as one (N, ...) array."""
    return np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])


# --- the strokes ------------------------------------------------------------------------------


def trajectory(strokes) -> torch.Tensor:
    """A drawing's trajectory: its strokes as the model of the strokes reads them, shape
    (1, TRAJECTORY_FEATURES, TRAJECTORY_POINTS), float32 (`trajectory_features` as a batch of
    one)."""
    return torch.from_numpy(trajectory_features(strokes))[None]


def trajectory_features(strokes, points: int = TRAJECTORY_POINTS) -> np.ndarray:
    """A drawing's strokes as the model of the strokes reads them, one drawing's trajectory:
    (5, points) float32.

    *strokes*: each stroke the points the canvas sampled between pen down and pen up, (n, 2),
    x to the right and y down, in any unit (canvas pixels; a tablet's y flipped). Each goes
    through the canvas's own curves (`canvas_path`); the ink is centred on its bounding box and
    scaled by its larger side (aspect kept), then `points` points are taken equally spaced
    along it, shared between the strokes in proportion to their length (at least one each).
    Each point: x, y, the step from the previous point (at a pen lift, the jump from the last
    stroke's end) and a flag at each stroke's start but the first. How densely the strokes were
    sampled (a mouse, a finger, a tablet every 100 ms) barely changes it: only the curves count.

    Raises EmptyImageError without a point, ImageFormatError for points that are not finite
    (x, y) pairs.
    """
    try:
        lines = [np.asarray(stroke, dtype=np.float64).reshape(-1, 2) for stroke in strokes]
    except (TypeError, ValueError) as exc:
        raise ImageFormatError(f"Strokes must be lists of (x, y) points ({exc}).") from exc
    lines = [canvas_path(line) for line in lines if len(line)]
    if not lines:
        raise EmptyImageError("Nothing is drawn yet: draw a digit on the canvas.")
    everything = np.concatenate(lines)
    if not np.isfinite(everything).all():
        raise ImageFormatError("Strokes hold points that are not finite numbers.")
    if len(lines) > points:  # more strokes than points: the longest ones
        lengths = [line_length(line) for line in lines]
        keep = sorted(np.argsort(lengths)[::-1][:points])
        lines = [lines[i] for i in keep]
    low, high = everything.min(axis=0), everything.max(axis=0)
    scale = max(float((high - low).max()), 1e-6)
    lines = [(line - (low + high) / 2) / scale for line in lines]
    lengths = np.array([line_length(line) for line in lines])
    total = lengths.sum()
    weights = lengths / total if total > 0 else np.full(len(lines), 1 / len(lines))  # dots
    share = weights * (points - len(lines))
    counts = 1 + np.floor(share).astype(int)
    for i in np.argsort(-(share - np.floor(share)))[: points - counts.sum()]:
        counts[i] += 1
    xy = np.concatenate([resample(line, count=n) for n, line in zip(counts, lines, strict=True)])
    lift = np.concatenate([np.eye(1, n).ravel() for n in counts])
    lift[0] = 0.0  # the first stroke's start is no pen lift
    step = np.diff(xy, axis=0, prepend=xy[:1])
    return np.concatenate([xy * 2, step * points / 4, lift[:, None]], axis=1).T.astype(np.float32)


def canvas_path(points: np.ndarray, steps: int = 4) -> np.ndarray:
    """The curve the canvas's pencil brush (fabric.js) draws through sampled points: a straight
    start to the first midpoint, then quadratic curves from midpoint to midpoint with each
    sampled point as control point, then straight to the last point. Pen points sampled every
    100 ms would otherwise be joined by straight lines, with corners no canvas shows."""
    if len(points) < 3:
        return points
    mids = (points[:-1] + points[1:]) / 2
    t = np.linspace(0, 1, steps + 1)[1:, None, None]
    start, control, end = mids[:-1], points[1:-1], mids[1:]
    curves = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end  # (steps, n - 2, 2)
    return np.concatenate(
        [points[:1], mids[:1], curves.transpose(1, 0, 2).reshape(-1, 2), points[-1:]]
    )


def draw_strokes(strokes, brush_width: float, canvas_size: int = CANVAS_SIZE) -> np.ndarray:
    """Strokes in canvas pixels (x to the right, y down) drawn as the canvas draws them: white on
    black, canvas_size x canvas_size uint8, each stroke along the canvas's own curves
    (`canvas_path`) with a round brush `brush_width` px wide, where it was drawn."""
    canvas = Image.new("L", (canvas_size, canvas_size))
    pen = ImageDraw.Draw(canvas)
    radius = brush_width / 2
    for stroke in strokes:
        line = canvas_path(np.asarray(stroke, dtype=np.float64))
        # Vertices at least a third of the brush apart, each stamped with the round brush: round
        # caps and joins, and none of the spikes a wide line gets from many tiny segments.
        vertices = resample(line, spacing=max(1.0, brush_width / 3))
        if len(vertices) > 1:
            pen.line([tuple(point) for point in vertices], fill=255, width=round(brush_width))
        for x, y in vertices:
            pen.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    return np.asarray(canvas)


def resample(
    points: np.ndarray, spacing: float | None = None, count: int | None = None
) -> np.ndarray:
    """Points along the polyline `points`, evenly spaced, ends kept: `spacing` apart (a line of
    no length: its first point), or `count` of them (a line of no length: its first point
    `count` times)."""
    lengths = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(points, axis=0).T))])
    if lengths[-1] == 0:
        return np.repeat(points[:1], count or 1, axis=0)
    if count is None:
        count = max(2, int(lengths[-1] / spacing) + 1)
    along = np.linspace(0, lengths[-1], count)
    return np.stack(
        [np.interp(along, lengths, points[:, 0]), np.interp(along, lengths, points[:, 1])], 1
    )


def line_length(line: np.ndarray) -> float:
    """The length of the polyline `line`."""
    return float(np.hypot(*np.diff(line, axis=0).T).sum()) if len(line) > 1 else 0.0
