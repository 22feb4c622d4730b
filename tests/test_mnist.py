"""mnist.py: IDX parsing and validation, and checksummed downloads from a local HTTP server."""

import gzip
import hashlib

import numpy as np
import pytest
import torch
from mnist_files import http_server, idx_bytes, write_idx, write_random_mnist

import mnist

IMAGES = idx_bytes(np.zeros((50, 28, 28), np.uint8))


def test_reads_gzipped_and_plain_idx_files(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    for compress in (True, False):
        path = write_idx(tmp_path / f"images-{compress}", images, compress=compress)
        assert np.array_equal(mnist.read_idx(path), images)


def test_load_split_gives_uint8_images_and_int64_labels(tmp_path):
    write_random_mnist(tmp_path, n_train=10, n_test=4)
    images, labels = mnist.load_split(tmp_path, "train")
    assert images.shape == (10, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10,) and labels.dtype == torch.int64
    assert mnist.load_split(tmp_path, "test")[0].shape == (4, 28, 28)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (gzip.compress(IMAGES[:-100]), "truncated or corrupt"),
        (gzip.compress(IMAGES)[:-20], "cannot read or decompress"),
        (gzip.compress(b"\x12\x34\x56\x78" + bytes(100)), "magic number 0x12345678"),
        (b"\x00\x00", "too short"),
    ],
    ids=["truncated data", "truncated gzip stream", "wrong magic number", "tiny file"],
)
def test_a_damaged_file_is_a_clear_error(tmp_path, raw, message):
    (tmp_path / "images.gz").write_bytes(raw)
    with pytest.raises(mnist.DatasetError, match=message):
        mnist.read_idx(tmp_path / "images.gz")


@pytest.mark.parametrize(
    ("name", "array", "message"),
    [
        ("train-images-idx3-ubyte.gz", np.zeros((64, 32, 32)), "28x28"),
        ("train-labels-idx1-ubyte.gz", np.zeros(63), "labels for 64 images"),
        ("train-labels-idx1-ubyte.gz", np.full(64, 10), "digits 0-9"),
    ],
    ids=["not 28x28", "fewer labels", "label 10"],
)
def test_files_that_do_not_fit_together_are_rejected(tmp_path, name, array, message):
    write_idx(write_random_mnist(tmp_path) / name, array)
    with pytest.raises(mnist.DatasetError, match=message):
        mnist.load_split(tmp_path, "train")


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(mnist.DatasetError, match=r"missing in .*--download"):
        mnist.load_split(tmp_path, "train")


# --- downloads ---------------------------------------------------------------------------------

DEAD = "http://127.0.0.1:9/"  # the discard port: nothing listens


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server serving random MNIST files; yields (base url, checksums, folder)."""
    served = write_random_mnist(tmp_path / "served", n_train=20, n_test=5)
    checksums = {
        path.name: hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
        for path in sorted(served.glob("*.gz"))
    }
    with http_server(served) as url:
        yield url, checksums, served


def test_download_falls_back_to_the_next_mirror_and_verifies_every_file(tmp_path, mirror):
    url, checksums, served = mirror
    target = tmp_path / "data"
    mnist.download(target, mirrors=[DEAD, url], checksums=checksums, timeout=5)
    assert sorted(p.name for p in target.iterdir()) == sorted(checksums)  # no temporary file
    for name in checksums:
        assert (target / name).read_bytes() == (served / name).read_bytes()


def test_checksum_mismatch_is_rejected_and_leaves_nothing(tmp_path, mirror):
    url, checksums, _ = mirror
    wrong = dict(checksums, **{"train-labels-idx1-ubyte.gz": "0" * 64})
    target = tmp_path / "data"
    with pytest.raises(mnist.DatasetError, match="checksum mismatch"):
        mnist.download(target, mirrors=[url], checksums=wrong)
    assert "train-labels-idx1-ubyte.gz" not in [p.name for p in target.iterdir()]
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]


def test_offline_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(mnist.DatasetError, match=r"copy the four MNIST .* into"):
        mnist.download(tmp_path, mirrors=[DEAD], timeout=2)


def test_existing_files_are_not_downloaded_again(tmp_path):
    write_random_mnist(tmp_path)
    mnist.download(tmp_path, mirrors=[DEAD], checksums={name: "any" for name in mnist.FILES})
