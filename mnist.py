"""The MNIST files: reading and validating IDX files, and downloading them with checksums.

torchvision is deliberately not used (its wheels need a CUDA build of torch); the IDX format is
simple enough to read with numpy.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import settings
from files import atomic_file

log = logging.getLogger("mnist")

# SHA-256 of the *uncompressed* files: mirrors compress them differently, the content is the same
# (these match the canonical MD5 sums published with MNIST).
FILES = {
    "train-images-idx3-ubyte.gz": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    ),
    "train-labels-idx1-ubyte.gz": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    ),
}
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(RuntimeError):
    """MNIST is missing, unreadable or fails its checksum; the message says what to do."""


def data_dir_from_env() -> Path:
    """`MNIST_DIR` if set, else data/mnist (settings.mnist_dir)."""
    return settings.mnist_dir()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not), validating its header against its size."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read or decompress it ({exc}).") from exc
    return parse_idx(raw, name=str(path))


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    if len(raw) < 4:
        raise DatasetError(f"{name}: too short to be an IDX file ({len(raw)} bytes).")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(
            f"{name}: not an IDX file (magic number 0x{raw[:4].hex()}; expected 0x000008NN)."
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DatasetError(f"{name}: truncated header.")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            f"{name}: the header announces shape {shape} ({expected} bytes) but the file has "
            f"{len(raw)} bytes: it is truncated or corrupt."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)


def load_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the "train" or "test" split."""
    data_dir = Path(data_dir)
    images_name, labels_name = SPLITS[split]
    require_files(data_dir, (images_name, labels_name))
    images = read_idx(data_dir / images_name)
    labels = read_idx(data_dir / labels_name)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetError(f"{images_name}: expected uint8 images of 28x28, got {images.shape}.")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(
            f"{labels_name}: {labels.shape} labels for {len(images)} images in {images_name}."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{labels_name}: labels must be digits 0-9.")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def require_files(data_dir: Path, names: Sequence[str] = tuple(FILES)) -> None:
    missing = [name for name in names if not (data_dir / name).is_file()]
    if missing:
        raise DatasetError(
            f"MNIST files missing in {data_dir}: {', '.join(missing)}. Run `python train.py "
            f"--download` to fetch them, or copy the four *-ubyte.gz files there (or point "
            f"--data-dir / MNIST_DIR at a folder that has them)."
        )


def download(
    data_dir: str | Path,
    mirrors: Sequence[str] = MIRRORS,
    checksums: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> None:
    """Fetch each missing file from the first mirror that serves it with the right checksum.

    A file is written to a temporary name beside its target and renamed only once verified, so
    an interrupted or bad download never leaves a half-written file under the real name.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    checksums = FILES if checksums is None else checksums
    for name, sha256 in checksums.items():
        target = data_dir / name
        if target.is_file():
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                _download_verified(url, target, sha256, timeout)
                log.info("downloaded %s from %s", name, url)
                break
            except (OSError, urllib.error.URLError, DatasetError) as exc:
                log.warning("could not get %s from %s: %s", name, url, exc)
                errors.append(f"{url}: {exc}")
        else:
            raise DatasetError(
                f"Could not download {name} (" + "; ".join(errors) + f"). Without internet, copy "
                f"the four MNIST *-ubyte.gz files into {data_dir} (or point --data-dir / "
                f"MNIST_DIR at them) and run again."
            )


def _download_verified(url: str, target: Path, sha256: str, timeout: float) -> None:
    with atomic_file(target) as tmp, urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(1 << 20):
            tmp.write(chunk)
        tmp.flush()
        actual = _content_sha256(Path(tmp.name))
        if actual != sha256:
            raise DatasetError(f"checksum mismatch (sha256 {actual}, expected {sha256})")


def _content_sha256(path: Path) -> str:
    """SHA-256 of the file's content, decompressed if it is gzip."""
    digest = hashlib.sha256()
    with path.open("rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"corrupt download ({exc})") from exc
    return digest.hexdigest()
