"""Write small MNIST-format datasets for tests, so no test needs the real MNIST download."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np

SUBSET = Path(__file__).parent / "data" / "mnist-subset"


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def write_random_mnist(directory: Path, n_train: int = 64, n_test: int = 16, seed: int = 0) -> Path:
    """Four MNIST files of random images and labels: valid format, meaningless content."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(
            directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8)
        )
    return directory


def copy_subset(directory: Path) -> Path:
    """The committed real MNIST subset (2,000 training and 500 test digits), copied."""
    shutil.copytree(SUBSET, directory, dirs_exist_ok=True)
    return directory
