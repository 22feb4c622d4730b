"""Test data: the committed MNIST and pen subsets, small MNIST-format files written on the fly,
and a local HTTP server to download from, so no test needs the internet."""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SUBSET = Path(__file__).parent / "data" / "mnist-subset"  # 2,000 training and 500 test digits
PEN_SUBSET = Path(__file__).parent / "data" / "pendigits-subset" / "pendigits-orig.tra"


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def write_random_mnist(directory: Path, n_train: int = 64, n_test: int = 16) -> Path:
    """Four MNIST files of random images and labels: valid format, meaningless content."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return directory


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """*directory* served on 127.0.0.1 while the block runs; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
