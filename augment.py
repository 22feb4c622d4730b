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
    thicken_probability: float = 0.3,
    thin_probability: float = 0.15,
) -> torch.Tensor:
    """Randomly distort a batch of (N, 1, 28, 28) images with values in [0, 1]."""
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

    return change_stroke_width(images, thicken_probability, thin_probability)


def change_stroke_width(
    images: torch.Tensor,
    thicken_probability: float,
    thin_probability: float,
    max_thicken: float = 2.0,
) -> torch.Tensor:
    """Fatten strokes by up to `max_thicken` pixels on each side, or thin them by up to one,
    for a random part of the batch: people draw with brushes of every width."""
    n = images.shape[0]
    choice = torch.rand(n, 1, 1, 1, device=images.device)
    amount = torch.rand(n, 1, 1, 1, device=images.device)
    dilated_once = F.max_pool2d(images, 3, stride=1, padding=1)
    dilated_twice = F.max_pool2d(dilated_once, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    thicken = (choice < thicken_probability) * amount * max_thicken
    thin = (choice >= 1 - thin_probability) * amount
    return (
        images
        + thicken.clamp(max=1) * (dilated_once - images)
        + (thicken - 1).clamp(min=0) * (dilated_twice - dilated_once)
        - thin * (images - eroded)
    )
