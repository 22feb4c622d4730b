"""mnist.py: IDX parsing and validation, and checksummed downloads from a local HTTP server."""

import functools
import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch
from mnist_files import SUBSET, idx_bytes, write_idx, write_random_mnist

import mnist


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


def test_committed_subset_is_real_mnist():
    images, labels = mnist.load_split(SUBSET, "train")
    assert images.shape == (2000, 28, 28)
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's first ten labels


def test_truncated_file_is_a_clear_error(tmp_path):
    data = idx_bytes(np.zeros((5, 28, 28), np.uint8))
    path = tmp_path / "truncated.gz"
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(mnist.DatasetError, match="truncated or corrupt"):
        mnist.read_idx(path)


def test_truncated_gzip_stream_is_a_clear_error(tmp_path):
    path = write_idx(tmp_path / "images.gz", np.zeros((50, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(mnist.DatasetError, match="cannot read or decompress"):
        mnist.read_idx(path)


def test_wrong_magic_number_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(100)))
    with pytest.raises(mnist.DatasetError, match="magic number 0x12345678"):
        mnist.read_idx(path)


def test_tiny_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(mnist.DatasetError, match="too short"):
        mnist.read_idx(path)


def test_images_that_are_not_28x28_are_rejected(tmp_path):
    write_random_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((64, 32, 32), np.uint8))
    with pytest.raises(mnist.DatasetError, match="28x28"):
        mnist.load_split(tmp_path, "train")


def test_label_count_must_match_image_count(tmp_path):
    write_random_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(63, np.uint8))
    with pytest.raises(mnist.DatasetError, match="labels for 64 images"):
        mnist.load_split(tmp_path, "train")


def test_labels_must_be_digits(tmp_path):
    write_random_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(64, 10, np.uint8))
    with pytest.raises(mnist.DatasetError, match="digits 0-9"):
        mnist.load_split(tmp_path, "train")


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(mnist.DatasetError, match=r"missing in .*--download"):
        mnist.load_split(tmp_path, "train")


# --- downloads ---------------------------------------------------------------------------------


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server serving the test's own MNIST files; yields (base url, checksums)."""
    served = write_random_mnist(tmp_path / "served", n_train=20, n_test=5)
    checksums = {
        path.name: hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
        for path in sorted(served.glob("*.gz"))
    }
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", checksums, served
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_fetches_and_verifies_every_file(tmp_path, mirror):
    url, checksums, served = mirror
    target = tmp_path / "data"
    mnist.download(target, mirrors=[url], checksums=checksums)
    for name in checksums:
        assert (target / name).read_bytes() == (served / name).read_bytes()
    assert mnist.load_split(target, "train")[0].shape == (20, 28, 28)
    assert not list(target.glob("*.tmp")) and not list(target.glob(".*"))


def test_download_falls_back_to_the_next_mirror(tmp_path, mirror):
    url, checksums, _ = mirror
    dead = "http://127.0.0.1:9/"  # discard port: nothing listens
    mnist.download(tmp_path / "data", mirrors=[dead, url], checksums=checksums, timeout=5)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(checksums)


def test_checksum_mismatch_is_rejected_and_leaves_nothing(tmp_path, mirror):
    url, checksums, _ = mirror
    wrong = dict(checksums, **{"train-labels-idx1-ubyte.gz": "0" * 64})
    target = tmp_path / "data"
    with pytest.raises(mnist.DatasetError, match="checksum mismatch"):
        mnist.download(target, mirrors=[url], checksums=wrong)
    assert not (target / "train-labels-idx1-ubyte.gz").exists()
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]


def test_offline_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(mnist.DatasetError, match=r"copy the four MNIST .* into"):
        mnist.download(tmp_path, mirrors=["http://127.0.0.1:9/"], timeout=2)


def test_existing_files_are_not_downloaded_again(tmp_path):
    write_random_mnist(tmp_path)
    mnist.download(
        tmp_path,
        mirrors=["http://127.0.0.1:9/"],
        timeout=2,
        checksums={name: "irrelevant" for name in mnist.FILES},
    )
