"""pendigits.py: reading UNIPEN files, splitting by writer, drawing strokes, downloading."""

from __future__ import annotations

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
        image = pendigits.render(strokes, np.random.default_rng(seed))
        assert image.shape == (utils.CANVAS_SIZE, utils.CANVAS_SIZE)
        edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert image.max() == 255 and edges.max() == 0, f"seed {seed}: ink cut at the edge"
    digits = pendigits.load(PEN_SUBSET)[:20]
    first, _ = pendigits.render_for_training(digits, 2, seed=5)
    again, labels = pendigits.render_for_training(digits, 2, seed=5)
    other, _ = pendigits.render_for_training(digits, 2, seed=6)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert first.shape == (40, 28, 28) and labels.tolist()[:2] == [digits[0].label] * 2


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
