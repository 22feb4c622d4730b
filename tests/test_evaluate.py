"""lab/evaluate.py: the drawn and pen sets, and accuracy measured as the app reads a drawing."""

import numpy as np
import pytest
import torch
from mnist_files import PEN_SUBSET, SUBSET

import mnist
import model
import utils
from lab import evaluate

MODEL = evaluate.Path(__file__).resolve().parent.parent / "models" / "model.pth"


@pytest.fixture(scope="module")
def subset():
    return mnist.load_split(SUBSET, "test")


def _ink_rows(image: np.ndarray) -> np.ndarray:
    return np.flatnonzero((image[:, :, :3] > 127).any(axis=(1, 2)))


def test_skeleton_of_a_thick_bar_is_one_pixel_wide_and_inside_it():
    bar = np.zeros((40, 60), dtype=bool)
    bar[15:25, 10:50] = True
    thin = evaluate.skeleton(bar)
    assert not (thin & ~bar).any()
    assert (thin[:, 20:40].sum(axis=0) == 1).all(), "one pixel per column along the bar"
    assert 10 <= thin.sum() <= 45


def test_skeleton_of_a_ring_is_a_thin_closed_loop_around_its_hole():
    radius = np.hypot(*(np.indices((60, 60)) - 30))
    ring = (radius > 12) & (radius < 22)
    thin = evaluate.skeleton(ring)
    assert not (thin & ~ring).any() and not thin[25:36, 25:36].any()  # inside, around the hole
    assert thin.sum() < ring.sum() / 4
    # Closed: a walk from the centre that never steps on the skeleton never reaches the edge.
    seen, todo = set(), [(30, 30)]
    while todo:
        y, x = todo.pop()
        if (y, x) not in seen and not thin[y, x]:
            assert 0 < y < 59 and 0 < x < 59, "the loop has a gap"
            seen.add((y, x))
            todo += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]


def test_pen_digits_are_opaque_canvases_with_strokes_of_the_brush_width(subset):
    images, labels = subset
    drawn = list(evaluate.pen_digits(images, labels, count=12, seed=3))
    assert len(drawn) == 12
    low = evaluate.PEN_BRUSH_WIDTHS[0]
    for digit in drawn:
        assert digit.style == "pen"
        assert digit.image.shape == (utils.CANVAS_SIZE, utils.CANVAS_SIZE, 4)
        assert digit.image.dtype == np.uint8
        assert (digit.image[:, :, 3] == 255).all()
        rows = _ink_rows(digit.image)
        height = rows[-1] - rows[0] + 1
        assert low <= height <= evaluate.PEN_DIGIT_SIZES[1] + 2
        # Every stroke is the brush's width: no ink run across a row is thinner than the
        # narrowest brush, except where a stroke's round end is cut.
        ink = digit.image[:, :, 0] > 127
        runs = np.diff(np.flatnonzero(np.diff(np.pad(ink[rows[len(rows) // 2]], 1))))[::2]
        assert runs.max() >= low - 2
    labels_seen = [digit.label for digit in drawn]
    again = [d.label for d in evaluate.pen_digits(images, labels, count=12, seed=3)]
    assert labels_seen == again, "the same seed picks the same digits"


def test_drawn_digits_take_every_style_in_turn(subset):
    images, labels = subset
    drawn = list(evaluate.drawn_digits(images, labels, count=16, seed=0))
    assert [d.style for d in drawn] == list(evaluate.DRAWN_STYLES) * 2
    for digit in drawn:
        assert digit.image.shape[:2] == (utils.CANVAS_SIZE, utils.CANVAS_SIZE)
        assert digit.image.dtype == np.uint8


def test_writing_styles_cover_every_digit_drawn_with_the_app_brush():
    count = 2 * len(evaluate.WRITING_STYLES)
    drawn = list(evaluate.styled_digits(count=count, seed=4))
    assert [d.style for d in drawn] == list(evaluate.WRITING_STYLES) * 2
    assert {d.label for d in drawn} == set(range(10))
    for digit in drawn:
        assert digit.label == int(digit.style[0])
        assert digit.image.shape == (utils.CANVAS_SIZE, utils.CANVAS_SIZE, 4)
        assert (digit.image[:, :, 3] == 255).all()
        rows = _ink_rows(digit.image)
        assert 100 <= rows[-1] - rows[0] + 1 <= 280
        ink = digit.image[:, :, 0] > 127
        widths = np.diff(np.flatnonzero(np.diff(np.pad(ink[rows[len(rows) // 2]], 1))))[::2]
        assert widths.min() >= utils.BRUSH_WIDTH - 3, "no stroke thinner than the brush"
    again = [d.image for d in evaluate.styled_digits(count=count, seed=4)]
    assert all(np.array_equal(a, d.image) for a, d in zip(again, drawn, strict=True))


def test_accuracy_by_style_groups_in_order_of_appearance():
    by_style = evaluate.accuracy_by_style([1, 2, None, 7], [1, 3, 0, 7], ["b", "a", "b", "a"])
    assert by_style == {"b": 0.5, "a": 0.5}
    assert list(by_style) == ["b", "a"]


@pytest.mark.parametrize("trained", [True, False], ids=["shipped", "untrained"])
def test_the_app_path_tells_the_shipped_model_from_an_untrained_one(subset, trained):
    """The committed weights through `utils.preprocess` read MNIST digits, canvas drawings, pen
    tracings, writing styles and the pen digits of writers 3 and 8 (held out of the shipped
    model's training) mostly right; an untrained model does not pass for a trained one."""
    images, labels = subset
    net = model.load_model() if trained else model.DigitCNN().eval()
    torch.manual_seed(0)
    report = evaluate.evaluate(net, images[:250], labels[:250], drawn_count=100, log=print)
    pen = evaluate.pen_writers_report(net, str(PEN_SUBSET), [3, 8], seed=1)
    assert set(report["drawn_accuracy_by_style"]) == set(evaluate.DRAWN_STYLES)
    assert pen["count"] == 80 and len(pen["by_digit"]) == 10
    found = [report[f"{name}_accuracy"] for name in ("test", "drawn", "pen", "styles")]
    found.append(pen["accuracy"])
    errors = [report[f"{name}_ece"] for name in ("test", "drawn", "pen", "styles")]
    errors.append(pen["ece"])
    print("expected calibration errors", errors)
    if trained:
        assert min(found) >= 0.93 and report["test_accuracy"] >= 0.98, found
        assert max(errors) < 0.06, errors  # as sure as it is right: within a few points
    else:
        assert max(found) < 0.5, found


def test_the_pen_writers_errors_are_counted_per_writer_for_each_model_and_the_pair():
    net = model.load_model()
    pen = evaluate.pen_writers_report(net, str(PEN_SUBSET), [3, 8], seed=1)
    by_writer = pen["errors_by_writer"]
    assert list(by_writer) == ["3", "8"] and sum(w["digits"] for w in by_writer.values()) == 80
    assert sum(w["pair"] for w in by_writer.values()) == round(80 * (1 - pen["accuracy"]))
    alone = pen["image_alone"]["accuracy"]
    assert sum(w["image"] for w in by_writer.values()) == round(80 * (1 - alone))
    assert all(0 <= w["strokes"] <= w["digits"] for w in by_writer.values())


def test_simulated_people_answer_then_the_learner_s_attempt_runs_and_the_models_are_compared(
    tmp_path,
):
    """`--simulate-people` on the committed subsets: writer 3 answers 20 digits, the learner's
    attempt runs (train.py with its recipe, a short one here, then the promotion rule), and the
    table compares the shipped model, the candidate and the live model after the verdict."""
    import hashlib
    import subprocess
    import sys

    import learner

    command = [
        sys.executable, "-m", "lab.evaluate", "--simulate-people", "--data-dir", str(SUBSET),
        "--pen-file", str(PEN_SUBSET), "--people-writers", "3", "--answers", "20",
        "--work-dir", str(tmp_path),
        "--train-args", "--limit 200 --epochs 1 --epoch-size 256 --trajectory-epochs 1",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=evaluate.Path(__file__).parent.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "stored 20 answers" in out and f"train.py {' '.join(learner.RECIPE)}" in out
    promoted = "attempt promoted" in out
    assert promoted != ("attempt refused" in out) and "held-out feedback" in out, out
    live = "new live (promoted)" if promoted else "new live (refused: shipped)"
    assert f"| set | shipped | candidate | {live} |" in out
    rows = {line.split(" | ")[0]: line for line in out.splitlines() if "errors" in line}
    assert list(rows) == [
        "| people's other digits (writers 3), 20 digits",
        "| other held-out writers (8,14,19,25,30), 40 digits",
        "| MNIST test, 500 digits",
    ]
    shipped_mnist = int(rows["| MNIST test, 500 digits"].split(" | ")[1].split()[0])
    assert shipped_mnist < 25  # the shipped model reads MNIST's test digits (99%)
    live_bytes = (tmp_path / "live" / "model.pth").read_bytes()
    if promoted:  # the live file is the candidate's weights
        assert f"the candidate {hashlib.sha256(live_bytes).hexdigest()[:12]} is live" in out
    else:
        assert live_bytes == MODEL.read_bytes()
