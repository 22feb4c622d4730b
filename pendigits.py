"""Pen digits: real handwriting recorded as pen strokes, read from UNIPEN and drawn as the canvas
draws them.

The file is the UCI "Pen-Based Recognition of Handwritten Digits" training set (dataset 81,
E. Alpaydin and F. Alimoglu, CC BY 4.0): 7,494 digits by 30 writers, as strokes: the x, y
points between pen-down and pen-up, sampled every 100 ms on a tablet. That is what the app's
canvas records, so `place_and_draw` draws them with the canvas's round brush on a 280x280
canvas, and `render_for_training` takes each rendering through `utils.preprocess`, as the app
would.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import settings
import utils
from files import atomic_file
from mnist import DatasetError

log = logging.getLogger("pendigits")

FILE_NAME = "pendigits-orig.tra"
SHA256 = "a66225d68d7d68591e62944df1ad33b3f5aa608e2df2505844b41f5568a80da4"  # uncompressed
# The UCI archive holds the file compressed with Unix `compress` (pendigits-orig.tra.Z).
URLS = (
    "https://archive.ics.uci.edu/static/public/81/pen+based+recognition+of+handwritten+digits.zip",
    "https://archive.ics.uci.edu/ml/machine-learning-databases/pendigits/pendigits-orig.tra.Z",
)
# Writers whose digits are kept out of training by default, to measure the model on handwriting
# it has never seen: 6 of the 30, spread over the ids.
HELD_OUT_WRITERS = (3, 8, 14, 19, 25, 30)
# Bump when `place_and_draw` changes: cached renderings of another version are drawn again.
RENDERING = 3

_SEGMENT = re.compile(r'^\.SEGMENT\s+DIGIT\s+[\d-]+\s+\S+\s+"(.*)"\s*$')
_POINT = re.compile(r"^\s*(-?\d+)\s+(-?\d+)\s*$")


@dataclass(frozen=True)
class PenDigit:
    label: int
    writer: int
    strokes: tuple[np.ndarray, ...]  # each (n, 2) int32: x to the right, y up (tablet)


def default_path() -> Path:
    """`PENDIGITS_DIR`/pendigits-orig.tra if that variable is set, else data/pendigits/..."""
    return settings.pendigits_dir() / FILE_NAME


def load(path: str | Path) -> list[PenDigit]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"Pen digits file missing: {path}. Run `python train.py --download` to fetch it from "
            f"the UCI repository, or copy {FILE_NAME} there (or point --pen-file / PENDIGITS_DIR "
            f"at it); without it, train on MNIST alone with `--sources mnist`."
        )
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read it as a UNIPEN text file ({exc}).") from exc
    return parse_unipen(text, name=str(path))


def parse_unipen(text: str, name: str = "UNIPEN data") -> list[PenDigit]:
    """Every digit of a UNIPEN file; a malformed file is a DatasetError naming the line."""
    digits: list[PenDigit] = []
    label = writer = None
    strokes: list[np.ndarray] = []
    points: list[tuple[int, int]] | None = None  # the stroke being read, between pen down/up
    pen_down_line = segment_line = 0

    def fail(number: int, problem: str) -> DatasetError:
        return DatasetError(f"{name}, line {number}: {problem}")

    def finish_segment(number: int) -> None:
        if label is None:
            return
        if writer is None:
            raise fail(segment_line, "digit without a .COMMENT line giving its writer")
        if not strokes:
            raise fail(number, f"the digit of line {segment_line} has no strokes")
        digits.append(PenDigit(label, writer, tuple(strokes)))

    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if points is not None:
            if match := _POINT.match(line):
                points.append((int(match[1]), int(match[2])))
                continue
            if not line.strip().startswith("."):
                raise fail(number, f"expected two integers 'x y', found {line.strip()[:40]!r}")
            if line.strip() != ".PEN_UP":
                raise fail(
                    number,
                    f"the .PEN_DOWN of line {pen_down_line} has no .PEN_UP before this "
                    f"{line.split()[0]}",
                )
            if not points:
                raise fail(number, f"the stroke of line {pen_down_line} has no points")
            strokes.append(np.array(points, dtype=np.int32))
            points = None
            continue
        keyword = line.split(maxsplit=1)[0] if line.strip() else ""
        if keyword == ".SEGMENT":
            finish_segment(number)
            match = _SEGMENT.match(line.strip())
            if not match or not re.fullmatch(r"\d", match[1]):
                found = match[1] if match else line.strip()[:40]
                raise fail(number, f"expected a label 0-9 in .SEGMENT DIGIT, found {found!r}")
            label, writer, strokes, segment_line = int(match[1]), None, [], number
        elif keyword == ".COMMENT" and label is not None and writer is None:
            fields = line.split()
            if len(fields) < 3 or not fields[2].isdigit() or fields[1] != str(label):
                raise fail(number, f"expected '.COMMENT {label} <writer> <sample>', got {line!r}")
            writer = int(fields[2])
        elif keyword == ".PEN_DOWN":
            if label is None:
                raise fail(number, ".PEN_DOWN before any .SEGMENT")
            points, pen_down_line = [], number
        elif keyword == ".PEN_UP":
            raise fail(number, ".PEN_UP without a .PEN_DOWN")
        elif keyword and not keyword.startswith("."):
            raise fail(number, f"unexpected {line.strip()[:40]!r} outside a .PEN_DOWN block")
    if points is not None:
        raise fail(
            len(lines), f"file ends inside the .PEN_DOWN of line {pen_down_line}: truncated?"
        )
    finish_segment(len(lines))
    if not digits:
        raise DatasetError(f"{name}: no digits in it (no .SEGMENT DIGIT lines).")
    return digits


def split_writers(
    digits: Sequence[PenDigit], held_out: Iterable[int]
) -> tuple[list[PenDigit], list[PenDigit]]:
    """(digits of the other writers, digits of the `held_out` writers): no writer on both sides."""
    held_out = set(held_out)
    kept = [digit for digit in digits if digit.writer not in held_out]
    return kept, [digit for digit in digits if digit.writer in held_out]


# --- drawing ------------------------------------------------------------------------------------


def place_and_draw(
    strokes: Sequence[np.ndarray], rng: np.random.Generator, vary: bool = True
) -> np.ndarray:
    """A digit's strokes placed on the app's canvas (`on_canvas`: anywhere the digit fits whole)
    and drawn as the canvas would draw them (`utils.draw_strokes`: white on black, 280x280 uint8,
    a round brush along the canvas's own curves)."""
    return utils.draw_strokes(*on_canvas(strokes, rng, vary=vary))


def on_canvas(
    strokes: Sequence[np.ndarray], rng: np.random.Generator, vary: bool = True
) -> tuple[list[np.ndarray], float]:
    """A digit's strokes (x to the right, y up, any unit: a tablet's) placed on the app's canvas:
    each stroke's points in canvas pixels (x to the right, y down), and the brush width.

    With `vary`, each call places it as another person or device might: brush 10-30 px around
    the app's 18 px, 70-250 px tall, slanted, rotated, stretched, each stroke put down a little
    off and every point jittered. Without it: the app's brush, 100-250 px tall, nothing else.
    """
    lines = [stroke.astype(np.float64) * (1.0, -1.0) for stroke in strokes]  # y down on screen
    if vary:
        brush = rng.triangular(10, utils.BRUSH_WIDTH, 30)
        height = rng.uniform(max(70, 4 * brush), 250)  # fatter and strokes merge into blobs
        slant, angle = rng.uniform(-0.3, 0.3), np.radians(rng.uniform(-8, 8))
        aspect = rng.uniform(0.8, 1.2)
        cos, sin = np.cos(angle), np.sin(angle)
        warp = np.array([[aspect, 0.0], [-slant, 1.0]]) @ np.array([[cos, -sin], [sin, cos]])
        span = np.ptp(np.concatenate(lines), axis=0).max() or 1.0
        lines = [
            line @ warp.T
            + rng.normal(0, 0.02 * span, 2)  # where this stroke was put down
            + rng.normal(0, 0.004 * span, line.shape)  # the hand's tremor
            for line in lines
        ]
    else:
        brush, height = float(utils.BRUSH_WIDTH), rng.uniform(100, 250)
    everything = np.concatenate(lines)
    low, extent = everything.min(axis=0), np.ptp(everything, axis=0)
    size = utils.CANVAS_SIZE - brush - 6  # a 3 px margin: no stroke is cut by the edge
    scale = min(height / max(extent[1], 1e-6), size / max(extent.max(), 1e-6))
    room = size - extent * scale
    offset = brush / 2 + 3 + rng.uniform(0, 1, 2) * np.maximum(room, 0) - low * scale
    return [line * scale + offset for line in lines], float(brush)


# --- stroke-level variation -----------------------------------------------------------------


@dataclass(frozen=True)
class StrokeVariation:
    """How often `vary_strokes` writes a digit another way, each kind on its own: most digits
    stay as their writer wrote them (with these, about 70% of them; 4s and 9s, 0s, 6s and 8s
    about 55%)."""

    reorder: float = 0.1  # the strokes written in another order
    reverse: float = 0.1  # each stroke written the other way (start and end swapped)
    join: float = 0.15  # the pen not lifted: consecutive strokes one stroke
    split: float = 0.08  # the pen lifted mid-stroke: a small gap in a stroke
    open_top: float = 0.25  # a 4's or 9's top left open (the gap at the topmost point)
    close: float = 0.25  # a 0, 6, 8 or 9's loop closed: a stroke end pulled onto its loop


STROKE_VARIATION = StrokeVariation()
OPEN_TOP_DIGITS = (4, 9)
LOOP_DIGITS = (0, 6, 8, 9)


def vary_strokes(
    strokes: Sequence[np.ndarray],
    label: int,
    rng: np.random.Generator,
    odds: StrokeVariation = STROKE_VARIATION,
) -> list[np.ndarray]:
    """A digit's strokes (any unit, y up as the tablet records them) as its writer might have
    written them on another day: in another order or direction, a pen lift joined (the pen kept
    down from one stroke's end to the next stroke's start, where that is at most half the
    digit's size away: a one-stroke 4) or added (a stroke broken by a gap of 12-25% of the
    digit's size: where that is narrower than the brush, the round caps close it), a 4's or
    9's top left open (12-25%), a loop of a 0, 6, 8 or 9 closed (a stroke's end pulled onto
    the nearest point of the loop it falls short of). Each kind with its probability in
    `odds`; a kind that does not fit the digit (a gap with no room for it, no loop end near
    the loop) leaves it as it is."""
    lines = [np.asarray(stroke, dtype=np.float64) for stroke in strokes]
    span = float(np.ptp(np.concatenate(lines), axis=0).max()) or 1.0
    if len(lines) > 1 and rng.random() < odds.reorder:
        lines = [lines[i] for i in rng.permutation(len(lines))]
    lines = [line[::-1] if rng.random() < odds.reverse else line for line in lines]
    # A pen lift across more than half the digit stays lifted: kept down, the pen would draw a
    # line no writer draws (a 5's curl joined to its top bar closes it into a 6).
    lifts = [
        i for i in range(len(lines) - 1) if _distance(lines[i][-1], lines[i + 1][0]) <= span / 2
    ]
    if lifts and rng.random() < odds.join:
        at = lifts[int(rng.integers(len(lifts)))]  # this pen lift is joined
        lines[at : at + 2] = [_joined(lines[at], lines[at + 1])]
    if rng.random() < odds.split:
        lengths = [utils.line_length(line) for line in lines]
        at = int(np.argmax(lengths))  # the longest stroke: there is room for a gap
        where = lengths[at] * rng.uniform(0.25, 0.75)
        lines[at : at + 1] = _gap(lines[at], where, span * rng.uniform(0.12, 0.25))
    if label in OPEN_TOP_DIGITS and rng.random() < odds.open_top:
        lines = _open_top(lines, span * rng.uniform(0.12, 0.25))
    if label in LOOP_DIGITS and rng.random() < odds.close:
        lines = _close_loop(lines, span, end=bool(rng.integers(2)))
    return [line for line in lines if len(line)]


def _joined(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """One stroke: `first`, the pen's way to `second`'s start (points as far apart as the
    strokes' own, or the canvas's curves would cut the corners off), then `second`."""
    points = np.concatenate([first, second])
    gap = _distance(first[-1], second[0])
    spacing = max(utils.line_length(points) - gap, 1.0) / max(len(points), 2)
    steps = int(gap / spacing)
    between = first[-1] + (second[0] - first[-1]) * np.linspace(0, 1, steps + 2)[1:-1, None]
    return np.concatenate([first, between, second])


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.hypot(*(a - b)))


def _piece(line: np.ndarray, start: float, end: float) -> np.ndarray:
    """The part of polyline `line` from arc length `start` to `end`, ends interpolated."""
    lengths = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(line, axis=0).T))])
    inside = (lengths > start) & (lengths < end)
    ends = [
        np.stack([np.interp(at, lengths, line[:, 0]), np.interp(at, lengths, line[:, 1])])
        for at in (start, end)
    ]
    return np.concatenate([ends[0][None], line[inside], ends[1][None]])


def _gap(line: np.ndarray, where: float, gap: float) -> list[np.ndarray]:
    """`line` broken at arc length `where` by a gap `gap` long (the parts at least a quarter
    of the gap long each, or the stroke as it is)."""
    total = utils.line_length(line)
    if not (where - gap / 2 > gap / 4 and total - where - gap / 2 > gap / 4):
        return [line]
    return [_piece(line, 0, where - gap / 2), _piece(line, where + gap / 2, total)]


def _open_top(lines: list[np.ndarray], gap: float) -> list[np.ndarray]:
    """The digit's topmost point (y up, as the tablet records it) opened by `gap`: a gap there
    inside a stroke (a 9's loop, a one-stroke 4's apex), or the stroke's end taken back by
    `gap` where a stroke ends there (a two-stroke 4 whose strokes meet at the top)."""
    at = int(np.argmax([line[:, 1].max() for line in lines]))
    line = lines[at]
    lengths = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(line, axis=0).T))])
    where, total = lengths[int(np.argmax(line[:, 1]))], lengths[-1]
    if total < 3 * gap:
        return lines  # a dot or a tick: nothing to open
    if where < gap:
        pieces = [_piece(line, gap, total)]
    elif where > total - gap:
        pieces = [_piece(line, 0, total - gap)]
    else:
        pieces = _gap(line, where, gap)
    return [*lines[:at], *pieces, *lines[at + 1 :]]


def _close_loop(lines: list[np.ndarray], span: float, end: bool) -> list[np.ndarray]:
    """One stroke's end (the last stroke's last point with `end`, else the first stroke's first)
    extended to the nearest point of the digit within a quarter of its size that is not the
    end's own neighbourhood (a third of the size along the stroke): the loop it falls short of
    is closed. No such point: unchanged."""
    lines = list(lines)
    at = len(lines) - 1 if end else 0
    line = lines[at] if end else lines[at][::-1]
    lengths = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(line, axis=0).T))])
    far = line[lengths < lengths[-1] - span / 3]  # the stroke away from its end
    others = [other for i, other in enumerate(lines) if i != at]
    candidates = np.concatenate([far.reshape(-1, 2), *others])
    distances = np.hypot(*(candidates - line[-1]).T)
    if not len(distances) or distances.min() > span / 4:
        return lines
    closed = np.concatenate([line, candidates[int(np.argmin(distances))][None]])
    lines[at] = closed if end else closed[::-1]
    return lines


def render_for_training(
    digits: Sequence[PenDigit],
    views: int,
    seed: int,
    vary: bool = True,
    strokes: StrokeVariation | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`views` renderings of each digit, each taken through `utils.preprocess` as the app takes
    a drawing: (N * views, 28, 28) uint8 in MNIST's pixel range, and their labels. With
    `strokes` (and `vary`), each digit's strokes first go through `vary_strokes` with those
    odds, drawn from a random stream of their own: the renderings it leaves plain are the same
    as without it.

    Rendering `i` of view `v` depends only on (seed, i, v), so the set is the same whatever
    order or process it is made in.
    """
    images = torch.empty(
        (len(digits) * views, utils.FRAME_SIZE, utils.FRAME_SIZE), dtype=torch.uint8
    )
    labels = torch.empty(len(digits) * views, dtype=torch.int64)
    for i, digit in enumerate(digits):
        for view in range(views):
            rng = np.random.default_rng((seed, i, view))
            lines = digit.strokes
            if vary and strokes is not None:
                lines = vary_strokes(
                    lines, digit.label, np.random.default_rng((seed, i, view, 1)), strokes
                )
            model_input = utils.preprocess(place_and_draw(lines, rng, vary=vary))
            images[i * views + view] = torch.from_numpy(utils.to_pixels(model_input))
            labels[i * views + view] = digit.label
    return images, labels


# --- download -----------------------------------------------------------------------------------


def download(path: str | Path, urls: Sequence[str] = URLS, sha256: str = SHA256) -> None:
    """Fetch the file if it is missing: from the UCI archive (a zip holding it compressed with
    Unix `compress`) or the .Z file itself, checked by the SHA-256 of the uncompressed content
    and written atomically (a temporary file renamed once verified)."""
    path = Path(path)
    if path.is_file():
        return
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                content = _extract(response.read())
            actual = hashlib.sha256(content).hexdigest()
            if actual != sha256:
                raise DatasetError(f"checksum mismatch (sha256 {actual}, expected {sha256})")
        except (OSError, urllib.error.URLError, DatasetError, zipfile.BadZipFile) as exc:
            log.warning("could not get %s from %s: %s", FILE_NAME, url, exc)
            errors.append(f"{url}: {exc}")
            continue
        with atomic_file(path) as tmp:
            tmp.write(content)
        log.info("downloaded %s from %s", path, url)
        return
    raise DatasetError(
        f"Could not download {FILE_NAME} (" + "; ".join(errors) + f"). Without internet, copy "
        f"{FILE_NAME} (uncompressed, sha256 {sha256}) to {path}, or point --pen-file / "
        f"PENDIGITS_DIR at it, and run again."
    )


def _extract(payload: bytes) -> bytes:
    """The uncompressed file from a zip holding `FILE_NAME.Z`, a .Z file, or the file itself."""
    if payload[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1].startswith(FILE_NAME)]
            if not names:
                raise DatasetError(f"the archive holds no {FILE_NAME}")
            payload = archive.read(min(names, key=len))
    return uncompress(payload) if payload[:2] == b"\x1f\x9d" else payload


def uncompress(data: bytes) -> bytes:
    """Decompress Unix `compress` (.Z, LZW) data, which Python's standard library cannot.

    Codes are little-endian bit fields starting at 9 bits, growing to the header's maximum. The
    original writer emitted codes in groups of `bits` bytes (8 codes) and, whenever the width
    changed or a CLEAR code came, skipped the rest of the group: so must the reader.
    """
    if len(data) < 3 or data[:2] != b"\x1f\x9d":
        raise DatasetError("not a .Z file (wrong magic number)")
    max_bits, block_mode = data[2] & 0x1F, bool(data[2] & 0x80)
    if not 9 <= max_bits <= 16:
        raise DatasetError(f".Z file with unsupported code size {max_bits}")
    first_free = 257 if block_mode else 256
    table = [bytes([i]) for i in range(256)] + ([b""] if block_mode else [])
    out = bytearray()
    bits, position, group_start = 9, 3, 3
    buffer, held, previous = 0, 0, b""
    size = len(data)
    while True:
        if len(table) > (1 << bits) - 1 and bits < max_bits:
            position += -(position - group_start) % bits  # skip the rest of the group
            buffer, held, bits, group_start = 0, 0, bits + 1, position
        while held < bits and position < size:
            buffer |= data[position] << held
            held, position = held + 8, position + 1
        if held < bits:
            break
        code = buffer & ((1 << bits) - 1)
        buffer, held = buffer >> bits, held - bits
        if code == 256 and block_mode:
            position += -(position - group_start) % bits
            buffer, held, bits, group_start = 0, 0, 9, position
            del table[first_free:]
            previous = b""
            continue
        if code < len(table):
            entry = table[code]
        elif code == len(table) and previous:
            entry = previous + previous[:1]
        else:
            raise DatasetError(f"corrupt .Z data (code {code} at byte {position})")
        out += entry
        if previous and len(table) < 1 << max_bits:
            table.append(previous + entry[:1])
        previous = entry
    return bytes(out)
