"""explain.py: the evidence of each piece of a drawing's ink, read as the app reads a drawing
(whether it is faithful to the served model is measured: python -m lab.evaluate --explanations)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import explain
import model
import utils

SEVEN = [[(70, 50), (210, 50), (120, 240)]]  # canvas px, one stroke


@pytest.fixture(scope="module")
def shipped() -> model.DigitCNN:
    return model.load_model(model.DEFAULT_MODEL_PATH)


def test_each_point_of_the_ink_has_its_evidence_and_the_pairs_is_the_two_models_summed(shipped):
    found = explain.explain(shipped, SEVEN, answer=7, runner_up=1)
    assert [len(line) for line in found.strokes] == [len(e) for e in found.both]
    assert len(found.strokes) == 1 and len(found.strokes[0]) > explain.PIECES
    for both, image, trajectory in zip(found.both, found.image, found.trajectory, strict=True):
        np.testing.assert_allclose(both, image + trajectory)
    # Each piece's points share its evidence: PIECES values along the ink, not all alike.
    assert len(np.unique(np.concatenate(found.both))) == explain.PIECES


def test_a_piece_s_evidence_is_what_its_removal_takes_from_the_answer_s_log_odds(shipped):
    found = explain.explain(shipped, SEVEN, answer=7, runner_up=1)
    pieces = explain.piece_of_each_point(found.strokes, explain.PIECES)
    strongest = int(np.argmax([found.both[0][pieces[0] == k][0] for k in range(explain.PIECES)]))
    rest = explain.without(found.strokes, [p == strongest for p in pieces])

    def log_odds(strokes) -> float:
        image = utils.preprocess(utils.draw_strokes(strokes, utils.BRUSH_WIDTH))
        out = torch.log_softmax(shipped(image, utils.trajectory(strokes)), 1)[0]
        return float(out[7] - out[1])

    with torch.inference_mode():
        taken = log_odds(found.strokes) - log_odds(rest)
    assert taken == pytest.approx(found.both[0][pieces[0] == strongest][0], abs=1e-4)
    assert taken > 0  # the ink that most made it a 7 is evidence for the 7


def test_the_served_model_is_explained_through_the_weights_it_compiled(shipped):
    served = explain.explain(model.Compiled(shipped), SEVEN, 7, 1)
    plain = explain.explain(shipped, SEVEN, 7, 1)
    for a, b in zip(served.both, plain.both, strict=True):
        np.testing.assert_array_equal(a, b)


def test_another_model_explains_the_same_drawing_otherwise(shipped):
    torch.manual_seed(0)
    other = model.DigitCNN(members=2, trajectory=True).eval()
    first = np.concatenate(explain.explain(shipped, SEVEN, 7, 1).both)
    second = np.concatenate(explain.explain(other, SEVEN, 7, 1).both)
    assert not np.allclose(first, second)


def test_a_model_of_the_image_alone_is_explained_by_its_image(shipped):
    image_alone = model.DigitCNN(members=2).eval()
    image_alone.members.load_state_dict(shipped.members.state_dict())
    found = explain.explain(image_alone, SEVEN, 7, 1)
    assert found.trajectory is None
    assert all((b == i).all() for b, i in zip(found.both, found.image, strict=True))


def test_removed_points_cut_a_stroke_in_two():
    line = np.arange(10.0).repeat(2).reshape(-1, 2)
    gone = np.zeros(10, bool)
    gone[[0, 4, 5]] = True
    kept = explain.without([line], [gone])
    assert [part[:, 0].tolist() for part in kept] == [[1, 2, 3], [6, 7, 8, 9]]


def test_strokes_without_a_point_are_refused(shipped):
    with pytest.raises(utils.EmptyImageError):
        explain.explain(shipped, [[]], 7, 1)


def test_the_picture_is_a_png_of_the_size_asked_in_the_evidence_s_colours(shipped):
    found = explain.explain(shipped, SEVEN, 7, 1)
    png = explain.picture(found.strokes, found.both, size=110)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)
    assert Image.open(io.BytesIO(png)).size == (110, 110)
    near = lambda rgb: (np.abs(image - rgb).sum(axis=1) < 60).sum()  # noqa: E731
    assert near(explain.ANSWER_RGB) > 0  # the strongest evidence for the 7 in full colour
