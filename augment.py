"""Training-time augmentation that makes an MNIST model read digits drawn on a canvas.

People draw slanted, rotated, fat-brushed and thin digits; the preprocessing in utils.py removes
most differences of size and position but not these. Everything runs on whole batches in torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(
    images: torch.Tensor,
    max_rotation: float = 15.0,
    scale_range: tuple[float, float] = (0.85, 1.15),
    max_shear: float = 0.3,
    max_shift: float = 2.0,
    thicken_probability: float = 0.2,
    thin_probability: float = 0.15,
    restroke_probability: float = 0.3,
) -> torch.Tensor:
    """Randomly distort a batch of (N, 1, 28, 28) images with values in [0, 1]: an affine
    transform, then stroke width, then for part of the batch solid canvas-like strokes."""
    n = images.shape[0]
    rotation = torch.empty(n).uniform_(-max_rotation, max_rotation) * (math.pi / 180)
    scale = torch.empty(n).uniform_(*scale_range)
    aspect = torch.empty(n).uniform_(0.9, 1.1)
    shear = torch.empty(n).uniform_(-max_shear, max_shear)
    shift = torch.empty(n, 2).uniform_(-max_shift, max_shift) * (2 / images.shape[-1])

    cos, sin = torch.cos(rotation), torch.sin(rotation)
    rotate = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shear_x = torch.eye(2).repeat(n, 1, 1)
    shear_x[:, 0, 1] = shear
    stretch = torch.diag_embed(torch.stack([scale * aspect, scale / aspect], 1))
    distortion = rotate @ shear_x @ stretch
    # affine_grid maps output to input coordinates: it wants the inverse of the distortion.
    theta = torch.cat([torch.linalg.inv(distortion), shift[:, :, None]], dim=2).to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    images = change_stroke_width(images, thicken_probability, thin_probability)
    return restroke(images, restroke_probability)


def change_stroke_width(
    images: torch.Tensor,
    thicken_probability: float,
    thin_probability: float,
    max_thicken: float = 2.0,
) -> torch.Tensor:
    """Fatten strokes by up to `max_thicken` pixels on each side, or thin them, for a random
    part of the batch: people draw with brushes of every width.

    Thinning raises the ink threshold (up to half the full value) instead of eroding: most MNIST
    strokes are two or three pixels wide, and an erosion would leave a faint ghost of the digit
    that the app, which scales every drawing's darkest ink to full, never shows the model."""
    n = images.shape[0]
    choice = torch.rand(n, 1, 1, 1, device=images.device)
    amount = torch.rand(n, 1, 1, 1, device=images.device)
    dilated_once = dilate(images)
    dilated_twice = dilate(dilated_once)
    thicken = (choice < thicken_probability) * amount * max_thicken
    threshold = (choice >= 1 - thin_probability) * amount * 0.5
    thickened = (
        images
        + thicken.clamp(max=1) * (dilated_once - images)
        + (thicken - 1).clamp(min=0) * (dilated_twice - dilated_once)
    )
    return ((thickened - threshold) / (1 - threshold)).clamp(min=0)


def dilate(images: torch.Tensor) -> torch.Tensor:
    """3x3 grey dilation of an (N, C, H, W) batch: `max_pool2d(images, 3, 1, 1)`, computed
    as the maximum of shifted slices, which is several times faster on a CPU for C = 1."""
    padded = F.pad(images, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def restroke(
    images: torch.Tensor, probability: float, levels: tuple[float, float] = (0.15, 0.55)
) -> torch.Tensor:
    """Redraw a random part of the batch with solid, more even strokes, as a canvas draws them.

    MNIST strokes were scanned from paper: soft-edged, and of varying width; a canvas stroke is
    solid and even. Blurring a digit and cutting the blur at one level gives solid strokes whose
    widths are closer together, and whose overall width follows the level: a low level gives a
    fat brush (loops may close, as they do when people draw fat), a high one a thin pen. The cut
    is a steep sigmoid, so edges stay anti-aliased.
    """
    n = images.shape[0]
    picked = torch.rand(n, 1, 1, 1, device=images.device) < probability
    sigma = torch.empty(n, device=images.device).uniform_(0.7, 1.3)
    blurred = _gaussian_blur(images, sigma)
    blurred = blurred / blurred.amax((2, 3), keepdim=True).clamp(min=1e-3)
    level = torch.empty(n, 1, 1, 1, device=images.device).uniform_(*levels)
    steepness = 12.0
    stroke = torch.sigmoid((blurred - level) * steepness)
    floor = torch.sigmoid(-level * steepness)
    top = torch.sigmoid((1 - level) * steepness)
    stroke = ((stroke - floor) / (top - floor)).clamp(0, 1)
    return torch.where(picked, stroke, images)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of an (N, 1, H, W) batch with its own Gaussian (5x5, separable)."""
    n, _, height, width = images.shape
    offsets = torch.arange(-2, 3, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    rows = F.conv2d(
        images.reshape(1, n, height, width), kernel[:, None, None, :], padding=(0, 2), groups=n
    )
    both = F.conv2d(rows, kernel[:, None, :, None], padding=(2, 0), groups=n)
    return both.reshape(n, 1, height, width)


def flag_ones(
    images: torch.Tensor,
    labels: torch.Tensor,
    probability: float = 0.15,
    angles: tuple[float, float] = (25.0, 55.0),
    lengths: tuple[float, float] = (0.2, 0.45),
    max_lean: float = 12.0,
) -> torch.Tensor:
    """Give a random part of the batch's 1s the flag many people write at the top: a stroke
    from the top of the stem, turned `angles` degrees to the left of the stem's own direction
    (a 1 drawn upright gets a flag down to the left), `lengths` of the digit's height long and
    as wide as the digit's stroke.

    Most of MNIST's writers drew a 1 as a bare bar, so a model trained on it reads a flagged 1,
    the way much of Europe writes it, as a 7. Only 1s leaning at most `max_lean` degrees get a
    flag: on a 1 slanted like a "/", a flag would lie flat, and the digit would be a 7.
    """
    picked = (labels == 1) & (torch.rand(labels.shape, device=labels.device) < probability)
    picked = picked.nonzero().flatten()
    if len(picked) == 0:
        return images
    ones = images[picked]
    count, _, height, width = ones.shape
    ink = ones[:, 0] > 0.5
    rows = ink.any(dim=2)
    top = rows.to(images.dtype).argmax(dim=1)
    bottom = height - 1 - rows.flip(1).to(images.dtype).argmax(dim=1)
    x_top, x_bottom = _mean_column(ink, top), _mean_column(ink, bottom)
    y_top = top.to(images.dtype)
    stem_x, stem_y = x_bottom - x_top, bottom.to(images.dtype) - y_top
    stem_length = torch.hypot(stem_x, stem_y).clamp(min=1.0)
    stroke_width = (ink.sum(dim=(1, 2)) / stem_length).clamp(1.5, 4.0)
    upright = stem_x.abs() <= stem_y * math.tan(math.radians(max_lean))

    turn = torch.empty(count, device=images.device).uniform_(*angles) * (math.pi / 180)
    length = torch.empty(count, device=images.device).uniform_(*lengths) * stem_length
    cos, sin = torch.cos(turn), torch.sin(turn)
    # On screen (y down) this turns the stem's downward direction towards the left.
    flag_x = (stem_x * cos - stem_y * sin) / stem_length
    flag_y = (stem_x * sin + stem_y * cos) / stem_length
    end_x, end_y = x_top + length * flag_x, y_top + length * flag_y
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=images.dtype, device=images.device),
        torch.arange(width, dtype=images.dtype, device=images.device),
        indexing="ij",
    )
    flag = _segment_ink(xs, ys, x_top, y_top, end_x, end_y, stroke_width)
    flagged = (rows.any(dim=1) & upright)[:, None, None, None]
    images = images.clone()
    images[picked] = torch.where(flagged, torch.maximum(ones, flag[:, None]), ones)
    return images


def _mean_column(ink: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per image of an (N, H, W) boolean batch, the mean column of the ink in row `rows[i]`."""
    row = ink[torch.arange(len(rows), device=ink.device), rows].float()
    columns = torch.arange(ink.shape[2], dtype=row.dtype, device=ink.device)
    return (row * columns).sum(dim=1) / row.sum(dim=1).clamp(min=1)


def _segment_ink(xs, ys, x0, y0, x1, y1, width) -> torch.Tensor:
    """Anti-aliased ink of one straight stroke per image, from (x0, y0) to (x1, y1)."""
    dx, dy = (x1 - x0)[:, None, None], (y1 - y0)[:, None, None]
    px, py = xs - x0[:, None, None], ys - y0[:, None, None]
    along = ((px * dx + py * dy) / (dx * dx + dy * dy).clamp(min=1e-6)).clamp(0, 1)
    distance = torch.hypot(px - along * dx, py - along * dy)
    return (width[:, None, None] / 2 + 0.5 - distance).clamp(0, 1)
