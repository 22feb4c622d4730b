"""utils.preprocess: any drawing in, the MNIST-style 28x28 model input out."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

import mnist
import utils

SUBSET = Path(__file__).parent / "data" / "mnist-subset"


def draw_seven(size=280, box=(60, 40, 220, 240), width=18, ink="white", background="black"):
    """A 7 drawn with a solid brush inside `box` on a square canvas."""
    image = Image.new("RGB", (size, size), background)
    left, top, right, bottom = box
    middle = (left + right) // 2
    ImageDraw.Draw(image).line(
        [(left, top), (right, top), (middle, bottom)], fill=ink, width=width, joint="curve"
    )
    return np.asarray(image)


def pixels(image) -> np.ndarray:
    return utils.to_pixels(utils.preprocess(image)).astype(np.float32) / 255


def test_output_is_normalised_tensor_of_model_shape():
    batch = utils.preprocess(draw_seven())
    assert batch.shape == (1, 1, 28, 28)
    assert batch.dtype == torch.float32
    background = (0 - utils.MNIST_MEAN) / utils.MNIST_STD
    assert batch.min().item() == pytest.approx(background, abs=1e-5)
    assert batch.max().item() == pytest.approx((1 - utils.MNIST_MEAN) / utils.MNIST_STD, abs=1e-5)


def test_digit_fits_20px_box_centred_by_mass():
    frame = pixels(draw_seven())
    rows = np.flatnonzero(frame.max(1) > 0.05)
    cols = np.flatnonzero(frame.max(0) > 0.05)
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21, 22)
    ys, xs = np.indices(frame.shape)
    centre = ((ys * frame).sum() / frame.sum(), (xs * frame).sum() / frame.sum())
    assert centre == pytest.approx((14, 14), abs=1.0)


@pytest.mark.parametrize(
    "box",
    [
        (10, 10, 60, 70),  # small, top-left corner
        (200, 190, 270, 275),  # small, bottom-right corner
        (20, 5, 236, 275),  # fills the canvas
        (100, 100, 150, 170),  # small, centred
    ],
)
def test_same_digit_small_large_or_off_centre_gives_nearly_same_input(box):
    reference = pixels(draw_seven(box=(60, 40, 220, 240), width=18))
    scale = (box[3] - box[1]) / 200
    other = pixels(draw_seven(box=box, width=max(3, round(18 * scale))))
    assert np.abs(reference - other).mean() < 0.06
    assert _overlap(reference, other) > 0.9


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the two images blurred by a pixel, so a one-pixel shift of a thin
    stroke counts as nearly the same, and a different shape does not."""

    def blur(image):
        padded = np.pad(image, 1)
        return sum(padded[y : y + 28, x : x + 28] for y in range(3) for x in range(3)).ravel()

    a, b = blur(a), blur(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@settings(max_examples=40, deadline=None)
@given(
    left=st.integers(0, 200),
    top=st.integers(0, 180),
    size=st.integers(60, 260),
    canvas=st.sampled_from([200, 280, 400]),
)
def test_property_position_and_size_do_not_change_the_input(left, top, size, canvas):
    brush = max(3, round(18 * size / 200))
    left, top = left + brush, top + brush
    size = min(size, canvas - top - brush, (canvas - left - brush) * 5 // 4)
    if size < 40:
        return
    reference = pixels(draw_seven(box=(60, 40, 220, 240), width=18))
    box = (left, top, left + size * 4 // 5, top + size)
    moved = pixels(draw_seven(size=canvas, box=box, width=max(3, round(18 * size / 200))))
    assert _overlap(reference, moved) > 0.85


def test_both_polarities_give_the_same_input():
    light_on_dark = pixels(draw_seven())
    dark_on_light = pixels(draw_seven(ink="black", background="white"))
    assert np.abs(light_on_dark - dark_on_light).max() < 1e-6


@pytest.mark.parametrize(
    ("ink", "background"),
    [("red", "black"), ("blue", "white"), ("#00ff00", "#202020"), ("yellow", "navy")],
)
def test_any_ink_colour_on_any_background(ink, background):
    reference = pixels(draw_seven())
    coloured = pixels(draw_seven(ink=ink, background=background))
    assert _overlap(reference, coloured) > 0.9


def test_ink_in_one_channel_only_is_found_on_a_grey_background():
    """Grey images take a one-channel shortcut; ink that differs in one channel must not."""
    grey = np.full((280, 280, 3), 100, dtype=np.uint8)
    seven = draw_seven()[:, :, 0] > 127
    grey[seven, 2] = 250  # blue ink: red and green stay at the background's 100
    assert _overlap(pixels(draw_seven()), pixels(grey)) > 0.9
    rgba = np.dstack([grey, np.full(grey.shape[:2], 255, np.uint8)])
    assert _overlap(pixels(draw_seven()), pixels(rgba)) > 0.9


def test_rgba_with_transparent_background_uses_alpha_as_ink():
    rgb = draw_seven()
    rgba = np.zeros((*rgb.shape[:2], 4), dtype=np.uint8)
    rgba[:, :, :3] = 255  # colour is white everywhere: only alpha carries the drawing
    rgba[:, :, 3] = rgb[:, :, 0]
    assert _overlap(pixels(rgb), pixels(rgba)) > 0.95


def test_opaque_rgba_from_canvas_and_pil_and_grayscale_inputs_agree():
    rgb = draw_seven()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    grey = rgb[:, :, 0]
    reference = pixels(rgb)
    for other in (rgba, grey, Image.fromarray(rgb), Image.fromarray(rgba), Image.fromarray(grey)):
        assert np.abs(pixels(other) - reference).max() < 1e-6


def test_mnist_digits_pass_through_nearly_unchanged():
    images, _ = mnist.load_split(SUBSET, "test")
    for image in images[:50].numpy():
        assert _overlap(image / 255, pixels(image)) > 0.85


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((280, 280), np.uint8),
        np.full((280, 280, 3), 255, np.uint8),
        np.full((280, 280, 4), (0, 0, 0, 255), np.uint8),
        np.zeros((1, 1), np.uint8),
        np.zeros((0, 10), np.uint8),
    ],
    ids=["black", "white", "opaque-black-rgba", "1x1", "zero-size"],
)
def test_blank_images_raise_empty_image_error(image):
    with pytest.raises(utils.EmptyImageError, match=r"\w"):
        utils.preprocess(image)


def test_a_speck_is_not_a_digit():
    image = np.zeros((280, 280), np.uint8)
    image[140:146, 100:106] = 255
    with pytest.raises(utils.EmptyImageError, match="dot"):
        utils.preprocess(image)


def test_faint_noise_is_not_a_digit():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 20, size=(280, 280), dtype=np.uint8)
    with pytest.raises(utils.EmptyImageError):
        utils.preprocess(image)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((28, 28), np.float32),
        np.zeros((28, 28, 2), np.uint8),
        np.zeros((28, 28, 5), np.uint8),
        np.zeros((2, 28, 28, 3), np.uint8),
        [[0, 255], [255, 0]],
        "not an image",
    ],
    ids=["float", "2-channel", "5-channel", "4-d", "list", "str"],
)
def test_unreadable_inputs_raise_a_clear_format_error(image):
    with pytest.raises(utils.ImageFormatError, match="Expected"):
        utils.preprocess(image)


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5000, 5000), (7, 900)])
def test_extreme_sizes_give_an_input_or_a_clear_error(shape):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    try:
        batch = utils.preprocess(image)
    except utils.EmptyImageError:
        return
    assert batch.shape == (1, 1, 28, 28)
    assert torch.isfinite(batch).all()


def test_random_noise_gives_a_finite_input():
    rng = np.random.default_rng(2)
    batch = utils.preprocess(rng.integers(0, 256, size=(280, 280, 3), dtype=np.uint8))
    assert torch.isfinite(batch).all()


def test_to_pixels_inverts_normalize():
    image = np.arange(28 * 28, dtype=np.int64).reshape(28, 28) % 256
    assert np.array_equal(utils.to_pixels(utils.normalize(image.astype(np.uint8))), image)
