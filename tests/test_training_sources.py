"""training/sources.py: the feedback source read from a real PostgreSQL holding drawings stored
as the app stores them (lab/people.py), its held-out split, and how the sources share an epoch."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest
import torch
from mnist_files import PEN_SUBSET

import pendigits
import utils
from lab import free_port, people
from model import DigitCNN
from training import sources
from training.config import TrainConfig


@pytest.fixture
def answered(fresh_pg_server):
    """A database with the app's tables and 40 answered drawings (4 pen writers' digits)."""
    people.create_schema(fresh_pg_server.url)
    digits = pendigits.load(PEN_SUBSET)[::4]
    answers = people.answer_all(fresh_pg_server.url, digits, DigitCNN().eval(), "m@0123456789ab")
    return fresh_pg_server, digits, answers


def test_the_split_is_the_sha256_of_the_submission_id_and_stable():
    ids = [uuid.UUID(int=n) for n in range(2000)]
    held = [sources.is_held_out(i, prediction_id=n) for n, i in enumerate(ids)]
    expected = [int(hashlib.sha256(str(i).encode()).hexdigest(), 16) % 5 == 0 for i in ids]
    assert held == expected and 0.17 < sum(held) / len(held) < 0.23
    # The row id plays no part when there is a submission id; without one, it decides.
    assert [sources.is_held_out(i, prediction_id=7) for i in ids] == held
    assert sources.is_held_out(None, 3) == (int(hashlib.sha256(b"3").hexdigest(), 16) % 5 == 0)


def test_feedback_is_read_with_its_labels_and_images_and_no_submission_is_on_both_sides(answered):
    server, digits, answers = answered
    drawings = sources.read_feedback(server.url)
    assert [d.id for d in drawings] == [a.prediction_id for a in answers]
    assert [d.label for d in drawings] == [digit.label for digit in digits]
    assert all(np.array_equal(d.image, a.image) for d, a in zip(drawings, answers, strict=True))
    held = sources.feedback_held_out(drawings)
    trained = [d for d in drawings if not d.held_out]
    held_ids = {d.submission_id for d in drawings if d.held_out}
    assert held_ids and trained and not held_ids & {d.submission_id for d in trained}
    assert len(held) == len(held_ids) == len(drawings) - len(trained)
    # Stable: more answers later move none of the earlier ones to the other side.
    people.answer_all(server.url, digits[:20], DigitCNN().eval(), "m@0123456789ab", seed=1)
    again = {d.id: d.held_out for d in sources.read_feedback(server.url)}
    assert all(again[d.id] == d.held_out for d in drawings) and len(again) == 60
    # A resumed run reads only the rows its first attempt read.
    assert len(sources.read_feedback(server.url, until=drawings[-1].id)) == 40


def test_a_drawing_is_drawn_for_training_as_it_was_on_the_canvas(answered):
    """The stored strokes, drawn on the canvas, give back the image the model read; handed to
    the pen digits' drawing (tablet y up) they keep their orientation, only scaled and moved."""
    server, _, _ = answered
    for drawing in sources.read_feedback(server.url)[:10]:
        canvas = utils.draw_strokes(drawing.strokes, utils.BRUSH_WIDTH)
        assert np.array_equal(utils.to_pixels(utils.preprocess(canvas)), drawing.image)
        lines, _ = pendigits.on_canvas(drawing.as_pen_digit().strokes, rng(), vary=False)
        before, after = np.concatenate(drawing.strokes), np.concatenate(lines)
        scale = np.ptp(after, axis=0) / np.ptp(before, axis=0)
        assert scale[0] == pytest.approx(scale[1]) and scale[0] > 0
        assert np.allclose(after - after[0], (before - before[0]) * scale[0])


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_an_unreachable_database_or_one_without_drawings_is_a_clear_error(fresh_pg_server):
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(sources.FeedbackError, match="database unreachable.*DATABASE_URL"):
        sources.read_feedback(closed)
    with pytest.raises(sources.FeedbackError, match="no drawings table"):
        sources.read_feedback(fresh_pg_server.url)
    people.create_schema(fresh_pg_server.url)
    assert sources.read_feedback(fresh_pg_server.url) == []


def source(name: str, size: int, share: float | None) -> sources.Source:
    images = sources.Images(torch.zeros((size, 28, 28), dtype=torch.uint8), torch.zeros(size))
    return sources.Source(name, images, share)


def test_each_source_gives_an_epoch_its_share_and_feedback_is_a_share_of_the_whole_epoch():
    found = [source("mnist", 600, None), source("pen", 100, 0.4), source("feedback", 30, 0.1)]
    counts = sources.per_epoch(found)
    assert counts == [540, 360, 100]  # pen 40% of MNIST + pen, feedback 10% of the same 1,000
    order = sources.epoch_order(found, counts, seed=1, epoch=0)
    assert len(order) == sum(counts)
    per_source = np.bincount(np.searchsorted([600, 700, 730], order.numpy(), side="right"))
    assert per_source.tolist() == counts
    feedback = order[order >= 700]
    assert np.bincount(feedback.numpy() - 700).min() >= 3  # 100 of 30: each 3 or 4 times
    assert torch.equal(order, sources.epoch_order(found, counts, seed=1, epoch=0))
    assert not torch.equal(order, sources.epoch_order(found, counts, seed=1, epoch=1))
    assert sources.per_epoch([source("feedback", 30, 0.1)]) == [30]  # alone: each once
    # A short epoch (a fine-tune): the same shares, part of MNIST, each image at most once.
    short = sources.per_epoch(found, epoch_size=222)
    assert short == [120, 80, 22]
    assert sources.per_epoch(found[:2]) == [600, 400]  # no feedback: as before
    mnist = sources.epoch_order(found, short, seed=1, epoch=0)
    mnist = mnist[mnist < 600]
    assert len(mnist) == len(set(mnist.tolist())) == 120 and mnist.max() > 120


def test_no_drawing_to_train_on_is_a_clear_error(answered, tmp_path, monkeypatch):
    server, _, _ = answered
    monkeypatch.setenv("DATABASE_URL", server.url)
    config = TrainConfig(
        limit=None, checkpoint_dir=tmp_path, feedback_views=2, seed=1, feedback_share=0.1
    )
    found = sources.load_feedback(config)
    assert found.held_out is not None and len(found.train) == 2 * (40 - len(found.held_out))
    # The model of the strokes learns from the strokes of the drawings trained on (as a tablet
    # records them, y up) and is measured on the held-out ones' trajectories, as the app reads
    # them.
    drawings = sources.read_feedback(server.url)
    trained = [d for d in drawings if not d.held_out]
    assert [d.label for d in found.strokes] == [d.label for d in trained]
    for digit, drawing in zip(found.strokes, trained, strict=True):
        pairs = zip(digit.strokes, drawing.strokes, strict=True)
        assert all(np.array_equal(a * (1, -1), b) for a, b in pairs)
    held = [d for d in drawings if d.held_out]
    expected = torch.cat([utils.trajectory(d.strokes) for d in held])
    assert torch.allclose(found.held_out.trajectories, expected)
    with server.connect() as conn:
        conn.execute("DELETE FROM predictions")
    with pytest.raises(sources.FeedbackError, match="0 answered drawings and none to train on"):
        sources.load_feedback(config)
