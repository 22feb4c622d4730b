"""augment.py: training-time distortions keep a digit a digit."""

import pytest
import torch
from mnist_files import SUBSET

import augment
import mnist


@pytest.fixture(scope="module")
def digits():
    images, _ = mnist.load_split(SUBSET, "train")
    return images[:64].unsqueeze(1).float() / 255


def _centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    ys = torch.arange(28.0).view(1, 1, 28, 1)
    xs = torch.arange(28.0).view(1, 1, 1, 28)
    mass = images.sum((2, 3))
    return torch.stack([(images * ys).sum((2, 3)) / mass, (images * xs).sum((2, 3)) / mass])


def test_augment_keeps_shape_range_and_the_digit_near_the_middle(digits):
    torch.manual_seed(0)
    out = augment.augment(digits)
    assert out.shape == digits.shape
    assert out.dtype == torch.float32
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5
    assert (out.sum((1, 2, 3)) > 0.3 * digits.sum((1, 2, 3))).all(), "no digit is lost"
    shift = (_centre_of_mass(out) - _centre_of_mass(digits)).abs()
    assert shift.max() < 6


def test_the_affine_distortion_changes_the_images_repeatably_with_a_seed(digits):
    def distort():
        torch.manual_seed(1)
        return augment.augment(
            digits, thicken_probability=0, thin_probability=0, restroke_probability=0
        )

    first = distort()
    assert torch.equal(first, distort())
    assert (first - digits).abs().mean() > 0.01


def test_thickening_adds_ink_and_thinning_removes_it(digits):
    thick = augment.change_stroke_width(digits, thicken_probability=1.0, thin_probability=0.0)
    thin = augment.change_stroke_width(digits, thicken_probability=0.0, thin_probability=1.0)
    ink = digits.sum((1, 2, 3))
    assert (thick.sum((1, 2, 3)) >= ink - 1e-3).all()
    assert thick.sum() > 1.2 * ink.sum()
    assert (thin.sum((1, 2, 3)) <= ink + 1e-3).all()
    assert thin.sum() < 0.9 * ink.sum()
    unchanged = augment.change_stroke_width(digits, thicken_probability=0, thin_probability=0)
    assert torch.equal(unchanged, digits)


def test_a_one_pixel_line_thickens_by_up_to_two_pixels_a_side_and_thinning_keeps_it():
    torch.manual_seed(0)
    line = torch.zeros(16, 1, 28, 28)
    line[:, :, 4:24, 14] = 1.0
    thick = augment.change_stroke_width(line, thicken_probability=1.0, thin_probability=0.0)
    widths = thick[:, 0, 14].sum(1)
    assert widths.min() >= 1 and 3.2 < widths.max() <= 5
    thinned = augment.change_stroke_width(line, thicken_probability=0.0, thin_probability=1.0)
    assert torch.equal(thinned, line)


def _row_width(image: torch.Tensor, columns: slice) -> float:
    """Ink across the middle row within `columns`, in pixels of full ink."""
    return float(image[0, 0, 14, columns].sum())


def test_restroke_brings_stroke_widths_closer():
    bars = torch.zeros(1, 1, 28, 28)
    bars[:, :, 4:24, 6:8] = 1.0  # a 2 px stroke
    bars[:, :, 4:24, 16:20] = 1.0  # a 4 px stroke
    before = _row_width(bars, slice(14, 22)) / _row_width(bars, slice(2, 12))
    even = augment.restroke(bars, probability=1.0, levels=(0.3, 0.3))
    after = _row_width(even, slice(14, 22)) / _row_width(even, slice(2, 12))
    assert before == 2.0
    assert after < 1.85
    assert even.max() == pytest.approx(1.0, abs=1e-3)
    assert even.min() == 0, "the background stays black"


def test_restroke_keeps_the_digit_and_touches_only_the_picked_part(digits):
    torch.manual_seed(0)
    assert torch.equal(augment.restroke(digits, probability=0.0), digits)
    even = augment.restroke(digits, probability=1.0)
    assert not torch.equal(even, digits)
    assert (even.amax((1, 2, 3)) > 0.99).all()
    shift = (_centre_of_mass(even) - _centre_of_mass(digits)).abs()
    assert shift.max() < 2.5, "whole strokes are kept, not a part of the digit"


def test_dilate_is_a_3x3_max_filter(digits):
    expected = torch.nn.functional.max_pool2d(digits, 3, stride=1, padding=1)
    assert torch.equal(augment.dilate(digits), expected)


def _upright_one() -> torch.Tensor:
    one = torch.zeros(1, 1, 28, 28)
    one[:, :, 4:24, 13:15] = 1.0
    return one


def test_a_flag_goes_from_the_top_of_an_upright_one_down_to_the_left():
    torch.manual_seed(0)
    ones = _upright_one().repeat(8, 1, 1, 1)
    flagged = augment.flag_ones(ones, torch.ones(8, dtype=torch.long), probability=1.0)
    added = (flagged - ones).clamp(min=0)[:, 0]
    assert (added.sum((1, 2)) > 3).all(), "every 1 got a flag"
    assert torch.equal(flagged.clamp(max=1), flagged) and torch.equal(flagged.max(ones), flagged)
    ys, xs = torch.nonzero(added > 0.5, as_tuple=True)[1:]
    assert xs.max() <= 13 and xs.min() >= 2, "left of the stem, inside the frame"
    assert ys.min() >= 3 and ys.max() <= 4 + 0.45 * 20, "hangs from the top, no longer than asked"


def test_only_ones_get_flags_and_a_blank_one_stays_blank():
    torch.manual_seed(0)
    images = torch.cat([_upright_one().repeat(3, 1, 1, 1), torch.zeros(1, 1, 28, 28)])
    labels = torch.tensor([7, 4, 1, 1])
    flagged = augment.flag_ones(images, labels, probability=1.0)
    assert torch.equal(flagged[:2], images[:2])
    assert flagged[2].sum() > images[2].sum()
    assert torch.equal(flagged[3], images[3])
    assert torch.equal(augment.flag_ones(images, labels, probability=0.0), images)


def test_a_one_slanted_like_a_slash_gets_no_flag_that_would_make_it_a_seven():
    slash = torch.zeros(1, 1, 28, 28)
    for row in range(4, 24):
        column = 20 - (row - 4) * 10 // 20
        slash[0, 0, row, column : column + 2] = 1.0
    flagged = augment.flag_ones(slash, torch.tensor([1]), probability=1.0)
    assert torch.equal(flagged, slash)
