"""utils.preprocess: any drawing in, the MNIST-style 28x28 model input out."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mnist_files import SUBSET
from PIL import Image, ImageDraw

import mnist
import utils


def draw_seven(size=280, box=(60, 40, 220, 240), width=18, ink="white", background="black"):
    """A 7 drawn with a solid brush inside `box` on a square canvas, as an RGB array."""
    image = Image.new("RGB", (size, size), background)
    left, top, right, bottom = box
    middle = (left + right) // 2
    ImageDraw.Draw(image).line(
        [(left, top), (right, top), (middle, bottom)], fill=ink, width=width, joint="curve"
    )
    return np.asarray(image)


def pixels(image) -> np.ndarray:
    return utils.to_pixels(utils.preprocess(image)).astype(np.float32) / 255


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the two images blurred by a pixel, so a one-pixel shift of a thin
    stroke counts as nearly the same, and a different shape does not."""

    def blur(image):
        padded = np.pad(image, 1)
        return sum(padded[y : y + 28, x : x + 28] for y in range(3) for x in range(3)).ravel()

    a, b = blur(a), blur(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


SEVEN = draw_seven()
REFERENCE = pixels(SEVEN)


def test_output_is_normalised_tensor_of_model_shape():
    batch = utils.preprocess(SEVEN)
    assert batch.shape == (1, 1, 28, 28)
    assert batch.dtype == torch.float32
    background = (0 - utils.MNIST_MEAN) / utils.MNIST_STD
    assert batch.min().item() == pytest.approx(background, abs=1e-5)
    assert batch.max().item() == pytest.approx((1 - utils.MNIST_MEAN) / utils.MNIST_STD, abs=1e-5)


def test_digit_fits_20px_box_centred_by_mass():
    rows = np.flatnonzero(REFERENCE.max(1) > 0.05)
    cols = np.flatnonzero(REFERENCE.max(0) > 0.05)
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21, 22)
    ys, xs = np.indices(REFERENCE.shape)
    mass = REFERENCE.sum()
    assert ((ys * REFERENCE).sum() / mass, (xs * REFERENCE).sum() / mass) == pytest.approx(
        (14, 14), abs=1.0
    )


@settings(max_examples=30, deadline=None)
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
    box = (left, top, left + size * 4 // 5, top + size)
    moved = draw_seven(size=canvas, box=box, width=max(3, round(18 * size / 200)))
    assert _overlap(REFERENCE, pixels(moved)) > 0.85


def test_mnist_digits_pass_through_nearly_unchanged():
    images, _ = mnist.load_split(SUBSET, "test")
    for image in images[:50].numpy():
        assert _overlap(image / 255, pixels(image)) > 0.85


def test_to_pixels_inverts_normalize():
    image = np.arange(28 * 28, dtype=np.int64).reshape(28, 28) % 256
    assert np.array_equal(utils.to_pixels(utils.normalize(image.astype(np.uint8))), image)


# --- any image: the digit, a finite input, or a clear error; never a crash --------------------


def _opaque(rgb: np.ndarray) -> np.ndarray:
    return np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])


def _transparent(rgb: np.ndarray) -> np.ndarray:
    """Black everywhere: only alpha carries the drawing."""
    return np.dstack([np.zeros_like(rgb), rgb[..., 0]])


def _blue_on_grey() -> np.ndarray:
    """Grey images take a one-channel shortcut; ink that differs in one channel must not."""
    grey = np.full((280, 280, 3), 100, dtype=np.uint8)
    grey[SEVEN[..., 0] > 127, 2] = 250
    return grey


def _faint_specks() -> np.ndarray:
    """Scanner dust: faint dots in the corners, far below the ink."""
    seven = SEVEN.copy()
    seven[[5, 5, 270, 270], [5, 270, 5, 270]] = 30
    return seven


def _speck() -> np.ndarray:
    image = np.zeros((280, 280), np.uint8)
    image[140:146, 100:106] = 255
    return image


def _noise(*shape: int, high: int = 256) -> np.ndarray:
    return np.random.default_rng(0).integers(0, high, size=shape, dtype=np.uint8)


def _line() -> np.ndarray:
    line = np.zeros((3, 5000), np.uint8)
    line[1, 500:4500] = 255
    return line


DIGIT, INPUT = "the seven", "an input"  # INPUT: a finite input or EmptyImageError
EMPTY, FORMAT = utils.EmptyImageError, utils.ImageFormatError
IMAGES = {
    "grey": (lambda: SEVEN[..., 0], DIGIT),
    "one-channel": (lambda: SEVEN[..., :1], DIGIT),
    "faint-ink": (lambda: draw_seven(ink=(45, 45, 45)), DIGIT),
    "faint-specks": (_faint_specks, DIGIT),
    "opaque-rgba": (lambda: _opaque(SEVEN), DIGIT),
    "transparent-rgba": (lambda: _transparent(SEVEN), DIGIT),
    "transparent-1400": (lambda: _transparent(draw_seven(1400, (300, 200, 1100, 1200), 90)), DIGIT),
    "black-on-white": (lambda: draw_seven(ink="black", background="white"), DIGIT),
    "red-on-black": (lambda: draw_seven(ink="red"), DIGIT),
    "green-on-grey": (lambda: draw_seven(ink="#00ff00", background="#202020"), DIGIT),
    "yellow-on-navy": (lambda: draw_seven(ink="yellow", background="navy"), DIGIT),
    "blue-on-grey-one-channel": (_blue_on_grey, DIGIT),
    "opaque-blue-on-grey": (lambda: _opaque(_blue_on_grey()), DIGIT),
    "fortran-order": (lambda: np.asfortranarray(SEVEN), DIGIT),
    "strided-view": (lambda: SEVEN[::2, ::2], DIGIT),
    **{
        f"PIL-{mode}": (lambda mode=mode: Image.fromarray(SEVEN).convert(mode), DIGIT)
        for mode in ["RGB", "RGBA", "L", "LA", "I;16", "F", "CMYK", "P", "1"]
    },
    "PIL-transparent": (lambda: Image.fromarray(_transparent(SEVEN)), DIGIT),
    "reversed-view": (lambda: SEVEN[::-1, ::-1], INPUT),
    "noise": (lambda: _noise(280, 280, 3), INPUT),
    "noise-rgba": (lambda: _noise(280, 280, 4), INPUT),
    "line-3x5000": (_line, INPUT),
    "line-5000x3": (lambda: _line().T, INPUT),
    "noise-7x900": (lambda: _noise(7, 900), INPUT),
    "black": (lambda: np.zeros((280, 280), np.uint8), EMPTY),
    "white": (lambda: np.full((280, 280, 3), 255, np.uint8), EMPTY),
    "black-rgba": (lambda: _opaque(np.zeros((280, 280, 3), np.uint8)), EMPTY),
    "transparent": (lambda: np.zeros((280, 280, 4), np.uint8), EMPTY),
    "black-2000": (lambda: np.zeros((2000, 2000), np.uint8), EMPTY),
    "white-1x5000": (lambda: np.full((1, 5000), 255, np.uint8), EMPTY),
    "1x1": (lambda: np.zeros((1, 1), np.uint8), EMPTY),
    "white-rgba-1x1": (lambda: np.full((1, 1, 4), 255, np.uint8), EMPTY),
    "zero-size": (lambda: np.zeros((0, 280), np.uint8), EMPTY),
    "speck": (_speck, EMPTY),
    "faint-noise": (lambda: _noise(280, 280, high=20), EMPTY),
    "float32": (lambda: SEVEN.astype(np.float32) / 255, FORMAT),
    "float-nan": (lambda: np.full((280, 280), np.nan, np.float32), FORMAT),
    "uint16": (lambda: SEVEN.astype(np.uint16) * 257, FORMAT),
    "int64": (lambda: SEVEN.astype(np.int64), FORMAT),
    "bool": (lambda: SEVEN[..., 0] > 0, FORMAT),
    "2-channel": (lambda: SEVEN[..., :2], FORMAT),
    "5-channel": (lambda: np.zeros((280, 280, 5), np.uint8), FORMAT),
    "4-d": (lambda: SEVEN[None], FORMAT),
    "1-d": (lambda: np.zeros(280, np.uint8), FORMAT),
    "0-d": (lambda: np.uint8(7), FORMAT),
    "list": (lambda: [[0, 255], [255, 0]], FORMAT),
    "bytes": (lambda: b"\x89PNG", FORMAT),
    "none": (lambda: None, FORMAT),
}


@pytest.mark.parametrize(("make", "outcome"), IMAGES.values(), ids=IMAGES)
def test_any_image_gives_the_digit_an_input_or_a_clear_error(make, outcome):
    image = make()
    if outcome in (EMPTY, FORMAT):
        with pytest.raises(outcome, match=r".{10}"):  # a message that says what is wrong
            utils.preprocess(image)
    elif outcome == DIGIT:
        assert _overlap(REFERENCE, pixels(image)) > 0.9
    else:
        try:
            batch = utils.preprocess(image)
        except utils.EmptyImageError:
            return
        assert batch.shape == (1, 1, 28, 28) and torch.isfinite(batch).all()


# --- utils.trajectory: the strokes as the model of the strokes reads them -------------------------

# A 4 in two strokes (canvas pixels, y down): down and across, then the stem.
FOUR = [[[60, 40], [45, 140], [150, 140]], [[120, 60], [118, 200]]]


def test_trajectory_has_the_models_shape_and_marks_each_pen_lift():
    trajectory = utils.trajectory(FOUR)
    assert trajectory.shape == (1, utils.TRAJECTORY_FEATURES, utils.TRAJECTORY_POINTS)
    assert trajectory.dtype == torch.float32
    lifts = trajectory[0, 4]
    assert lifts.sum() == 1 and lifts[0] == 0  # one pen lift: where the stem starts
    start = int(lifts.argmax())
    # x, y (scaled by the larger side, centred: within +-1); the stem's start is where it is.
    x, y = trajectory[0, 0], trajectory[0, 1]
    assert float(x.abs().max()) <= 1.0 + 1e-6 and float(y.abs().max()) <= 1.0 + 1e-6
    assert float(y[start]) < float(y[start - 1])  # the stem starts above the bar's end


def test_trajectory_ignores_where_and_how_large_the_digit_is_drawn():
    moved = [[[x * 1.5 + 30, y * 1.5 - 20] for x, y in stroke] for stroke in FOUR]
    assert np.allclose(utils.trajectory_features(moved), utils.trajectory_features(FOUR), atol=1e-5)


def test_trajectory_reads_the_curves_drawn_not_how_densely_they_were_sampled():
    """A pen sampled every 100 ms (a few points per stroke) and a mouse sampled every few pixels
    along the curve the canvas draws through those points give nearly the same input."""
    sparse = [np.array(s, dtype=float) for s in FOUR]
    dense = [utils.resample(utils.canvas_path(s), spacing=3.0).round() for s in sparse]
    assert all(len(d) > 20 * len(s) / 3 for d, s in zip(dense, sparse, strict=True))
    difference = np.abs(utils.trajectory_features(dense) - utils.trajectory_features(sparse))
    assert difference[:2].max() < 0.02  # x, y (scaled to -1..1): 1% of the digit's size


def test_trajectory_reads_stroke_direction_and_order():
    backwards = [stroke[::-1] for stroke in FOUR]
    reordered = FOUR[::-1]
    for other in (backwards, reordered):
        assert (
            np.abs(utils.trajectory_features(other) - utils.trajectory_features(FOUR)).max() > 0.5
        )


@pytest.mark.parametrize(
    ("strokes", "error"),
    [
        ([], utils.EmptyImageError),
        ([[]], utils.EmptyImageError),
        ([[[1, 2], [float("nan"), 3]]], utils.ImageFormatError),
        ([[[1, 2, 3]]], utils.ImageFormatError),
        ([["a", "b"]], utils.ImageFormatError),
        (None, utils.ImageFormatError),
    ],
    ids=["none", "empty-stroke", "nan", "not-pairs", "text", "not-a-list"],
)
def test_strokes_that_are_not_a_drawing_are_a_clear_error(strokes, error):
    with pytest.raises(error):
        utils.trajectory(strokes)


def test_a_dot_and_more_strokes_than_points_still_give_an_input():
    assert utils.trajectory([[[5, 5]]]).shape[2] == utils.TRAJECTORY_POINTS
    dots = [[[i, i % 7], [i + 1, i % 7]] for i in range(100)]
    assert torch.isfinite(utils.trajectory(dots)).all()


def test_the_placement_maps_the_ink_s_box_onto_the_digit_s_box_in_the_frame():
    ink = np.zeros((280, 280), dtype=np.float32)
    ink[60:220, 100:180] = 1.0  # 160 px tall, 80 wide: scaled to 20 x 10 in the frame
    pixels, placement = utils.place_digit(ink)
    np.testing.assert_array_equal(pixels, utils.center_digit(ink))
    corners = placement.to_frame(np.array([[100.0, 60.0], [180.0, 220.0]]))
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    np.testing.assert_allclose(corners, [[cols[0], rows[0]], [cols[-1] + 1, rows[-1] + 1]])
