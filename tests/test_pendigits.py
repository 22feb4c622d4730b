"""pendigits.py: reading UNIPEN files, splitting by writer, drawing strokes, downloading."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import numpy as np
import pytest
from mnist_files import PEN_SUBSET, http_server

import pendigits
import utils
from mnist import DatasetError

GOOD = """.INCLUDE        dene.doc
.LEXICON "0" "1" "2" "3" "4" "5" "6" "7" "8" "9"

.SEGMENT DIGIT    0 ? "7"
.COMMENT 7 12  224
.PEN_DOWN
 100  400
 300  400
 150  100
.PEN_UP
.PEN_DOWN
 120  250
 280  250
.PEN_UP
.DT 100

.SEGMENT DIGIT    2-3 ? "1"
.COMMENT 1  4   17
.PEN_DOWN
 200  400
 200  100
.PEN_UP
.DT 100
"""


def test_reads_digits_their_writers_and_strokes():
    digits = pendigits.parse_unipen(GOOD)
    assert [(d.label, d.writer, len(d.strokes)) for d in digits] == [(7, 12, 2), (1, 4, 1)]
    assert digits[0].strokes[1].tolist() == [[120, 250], [280, 250]]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (GOOD[: GOOD.index(" 280  250")], 12, "truncated"),
        (GOOD.replace('? "7"', '? "x"'), 4, "label 0-9"),
        (GOOD.replace(" 150  100\n.PEN_UP\n", " 150  100\n", 1), 10, "no .PEN_UP"),
        (GOOD.replace(" 300  400", " 300 four hundred"), 8, "two integers"),
    ],
    ids=["truncated", "bad label", "missing pen-up", "bad point"],
)
def test_a_malformed_file_is_an_error_naming_the_line(text, line, words):
    with pytest.raises(DatasetError, match=rf"test\.tra, line {line}: .*{words}"):
        pendigits.parse_unipen(text, name="test.tra")


def test_the_writer_split_never_puts_a_writer_on_both_sides():
    digits = pendigits.load(PEN_SUBSET)
    kept, held_out = pendigits.split_writers(digits, pendigits.HELD_OUT_WRITERS)
    assert {d.writer for d in held_out} == {3, 8}
    assert not {d.writer for d in kept} & {d.writer for d in held_out}
    assert len(kept) + len(held_out) == len(digits)


def test_rendering_stays_inside_the_canvas_and_repeats_for_a_seed():
    # A digit far wider than tall, and one that is a single point: the extremes of the fit.
    strokes = [np.array([[0, 0], [5000, 10]]), np.array([[2500, 5]])]
    for seed in range(30):
        image = pendigits.place_and_draw(strokes, np.random.default_rng(seed))
        assert image.shape == (utils.CANVAS_SIZE, utils.CANVAS_SIZE)
        edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert image.max() == 255 and edges.max() == 0, f"seed {seed}: ink cut at the edge"
    digits = pendigits.load(PEN_SUBSET)[:20]
    first, _ = pendigits.render_for_training(digits, 2, seed=5)
    again, labels = pendigits.render_for_training(digits, 2, seed=5)
    other, _ = pendigits.render_for_training(digits, 2, seed=6)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert first.shape == (40, 28, 28) and labels.tolist()[:2] == [digits[0].label] * 2


def _arc(degrees: tuple[float, float], centre=(150, 300), radii=(100, 100)) -> np.ndarray:
    """Points along an ellipse, counter-clockwise (y up, as the tablet records it)."""
    angles = np.radians(np.arange(degrees[0], degrees[1] + 1, 10))
    return np.stack([np.cos(angles), np.sin(angles)], 1) * radii + centre


def _dense(*corners) -> np.ndarray:
    """A stroke through `corners` with a point every 20 units, as a tablet samples a pen."""
    pieces = [
        np.linspace(a, b, max(2, int(np.hypot(*np.subtract(b, a)) / 20)), endpoint=False)
        for a, b in zip(corners[:-1], corners[1:], strict=True)
    ]
    return np.concatenate([*pieces, [corners[-1]]])


# Hand-made digits, y up: a two-stroke 4 (down and across, then the upright), a 9 whose loop's
# top is inside its one stroke, a 0 that falls short of closing at its top.
FOUR = (_dense((40, 400), (0, 150), (250, 150)), _dense((200, 330), (200, 0)))
NINE = (np.concatenate([_arc((10, 350), radii=(100, 100))[:-1], _dense((244, 266), (240, 0))]),)
ZERO = (_arc((105, 435), centre=(100, 150), radii=(100, 150)),)
ONLY = {
    kind: pendigits.StrokeVariation(**{k: 0.0 for k in ("reorder", "reverse", "join", "split",
                                                       "open_top", "close")} | {kind: 1.0})
    for kind in ("join", "split", "open_top", "close")
}  # fmt: skip


def _drawn(strokes, seed: int, vary: bool = False) -> np.ndarray:
    image = pendigits.place_and_draw(strokes, np.random.default_rng(seed), vary=vary)
    return image.astype(np.int64)


def _inside(image: np.ndarray) -> bool:
    edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return image.max() == 255 and edges.max() == 0


@pytest.mark.parametrize(
    ("kind", "label", "strokes", "more_ink"),
    [
        ("join", 4, FOUR, True),  # a line from the cross-bar's end to the upright's top
        ("split", 4, FOUR, False),  # a gap in the longer stroke
        ("open_top", 9, NINE, False),  # a gap at the loop's top
        ("close", 0, ZERO, True),  # a line across the gap at the top
    ],
)
def test_each_stroke_variation_changes_the_drawing_and_keeps_it_on_the_canvas(
    kind, label, strokes, more_ink
):
    large = 0
    for seed in range(10):
        varied = pendigits.vary_strokes(strokes, label, np.random.default_rng(seed), ONLY[kind])
        plain, changed = _drawn(strokes, seed), _drawn(varied, seed)
        assert _inside(changed), f"seed {seed}: ink cut at the edge"
        # Inked pixels counted, not compared one by one: a gap at the digit's edge moves it.
        more = int((changed > 0).sum()) - int((plain > 0).sum())
        more = more if more_ink else -more
        # A stroke drawn or a gap (a small drawing's gap may be narrower than the brush: its
        # round caps close it).
        assert more > 0, f"seed {seed}: {more} px more ink, for {kind}"
        large += more > 100
        assert _inside(_drawn(varied, seed, vary=True))
    assert large >= 7, f"hundreds of pixels inked or not in only {large} of 10 drawings"


def test_stroke_order_and_direction_change_what_a_joined_pen_lift_draws():
    joined = {
        tuple(map(bytes, pendigits.vary_strokes(FOUR, 4, np.random.default_rng(s), odds)))
        for s in range(10)
        for odds in (ONLY["join"], dataclasses.replace(ONLY["join"], reorder=1, reverse=1))
    }
    assert len(joined) > 1  # the pen goes from another stroke end to another start


def test_a_loop_end_far_from_its_loop_and_a_long_pen_lift_stay_as_written():
    one = (np.array([[0, 0], [0, 400]]),)  # a 1 has no loop to close
    assert pendigits.vary_strokes(one, 0, np.random.default_rng(0), ONLY["close"])[0].tolist() == (
        one[0].tolist()
    )
    # A 5's curl ending far from its top bar: joined, it would close into a 6.
    five = (np.array([[0, 400], [0, 200], [200, 100], [0, 0]]), np.array([[0, 400], [200, 400]]))
    five = (five[0], five[1][::-1])  # the top bar drawn from the right: 400 units from the curl
    kept = pendigits.vary_strokes(five, 5, np.random.default_rng(0), ONLY["join"])
    assert len(kept) == 2


def test_stroke_variation_is_deterministic_for_a_seed_and_leaves_plain_digits_as_they_were():
    digits = pendigits.load(PEN_SUBSET)[:40]
    odds = pendigits.STROKE_VARIATION
    first, _ = pendigits.render_for_training(digits, 2, seed=5, strokes=odds)
    again, _ = pendigits.render_for_training(digits, 2, seed=5, strokes=odds)
    assert np.array_equal(first, again)
    without, _ = pendigits.render_for_training(digits, 2, seed=5)
    never = pendigits.StrokeVariation(0, 0, 0, 0, 0, 0)
    zero, _ = pendigits.render_for_training(digits, 2, seed=5, strokes=never)
    assert np.array_equal(zero, without)  # their own random stream: the plain ones unchanged
    differ = (first != without).flatten(1).any(1)
    assert 0 < differ.sum() < len(first) / 2  # some varied, most plain


@pytest.fixture
def archive(tmp_path):
    """A local HTTP server serving a UCI-style zip that holds the subset compressed with Unix
    `compress`, as the real archive does; yields its URL."""
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "pendigits.zip", "w") as zipped:
        zipped.writestr("pendigits-orig.names", "about the data")
        zipped.write(PEN_SUBSET.with_suffix(".tra.Z"), "pendigits-orig.tra.Z")
    with http_server(served) as url:
        yield url + "pendigits.zip"


def test_download_unpacks_the_archive_and_checks_the_uncompressed_file(tmp_path, archive):
    target = tmp_path / "data" / pendigits.FILE_NAME
    sha256 = hashlib.sha256(PEN_SUBSET.read_bytes()).hexdigest()
    pendigits.download(target, urls=["http://127.0.0.1:9/", archive], sha256=sha256)
    assert target.read_bytes() == PEN_SUBSET.read_bytes()
    assert list(target.parent.iterdir()) == [target]


def test_a_bad_download_leaves_nothing_and_says_where_to_put_the_file(tmp_path, archive):
    target = tmp_path / "data" / pendigits.FILE_NAME
    with pytest.raises(DatasetError, match="checksum mismatch") as error:
        pendigits.download(target, urls=[archive], sha256="0" * 64)
    assert f"copy {pendigits.FILE_NAME}" in str(error.value) and str(target) in str(error.value)
    assert not target.parent.exists() or not list(target.parent.iterdir())
