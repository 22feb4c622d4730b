"""The training data, from three sources behind one interface: `load_data` gives train.py, for each
source, its training images and labels and the part kept out of training to measure on.

- mnist: MNIST's 60,000 scanned training digits (its 10,000 test digits: `mnist_test`).
- pen: real pen handwriting (`pendigits.py`), each digit drawn `--pen-views` times as the canvas
  would draw it; the digits of a few writers (`--held-out-writers`) are never trained on.
- feedback: the app's own answered drawings, read from its database (`read_feedback`) and drawn
  from their strokes with the same variation as the pen digits; a fixed fifth of them, chosen by
  submission id (`is_held_out`), is never trained on: people's drawings not trained on.

Every image is 28x28 uint8 as the model reads it (0 background, 255 ink), after
`utils.preprocess`. Renderings are cached in the checkpoint folder: a resumed run does not draw
them again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
import torch

import db
import mnist
import pendigits
import utils
from feedback import HELD_OUT_BUCKETS, is_held_out  # which answers are held out
from files import atomic_file
from mnist import DatasetError
from training.config import TrainConfig

log = logging.getLogger("sources")

NAMES = ("mnist", "pen", "feedback")

# The answered drawings: each answer (`predictions`) with the drawing it answers (`drawings`).
# Only the owner may read `drawings` (the app's role may only insert), so training connects with
# db.resolve_conninfo(owner=True). A resumed run reads the rows its first attempt read (`until`),
# not the ones stored since.
FEEDBACK_QUERY = """
SELECT p.id, p.submission_id, p.true_label, p.predicted_digit, p.created_at,
       d.strokes, d.canvas_size, d.brush_width, d.image
FROM predictions p JOIN drawings d ON d.prediction_id = p.id
WHERE %(until)s::bigint IS NULL OR p.id <= %(until)s
ORDER BY p.id
"""


class FeedbackError(DatasetError):
    """The app's drawings cannot be read (database unreachable, none stored); the message says
    what to do."""


@dataclass
class Images:
    """28x28 uint8 images as the model reads them and their labels."""

    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64

    @classmethod
    def empty(cls) -> Images:
        return cls(torch.empty((0, 28, 28), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class HeldOut(Images):
    """A part never trained on: reported as `title` in the log, under `key` in model.json."""

    key: str = ""
    title: str = ""
    about: dict = field(default_factory=dict)  # what it is (writers, drawings), for model.json
    # Each image's trajectory: its strokes as the app hands them to the model of the strokes
    # (`utils.trajectory`), (N, 5, points) float32; None where the strokes are not known.
    trajectories: torch.Tensor | None = None


@dataclass
class Source:
    """One source's training images, its share of each epoch (None: every image once per
    epoch) and its held-out part (None: nothing held out)."""

    name: str
    train: Images
    share: float | None
    held_out: HeldOut | None = None
    until: int | None = None  # feedback: the newest row read (a resume reads no newer ones)
    # The strokes behind the training images (pen digits, people's drawings: y up, as a
    # tablet records them), for the model of the strokes; none for scanned MNIST.
    strokes: list[pendigits.PenDigit] = field(default_factory=list)


@dataclass
class Data:
    """What train.py trains on: the sources, the images each gives an epoch, MNIST's test set."""

    sources: list[Source]
    per_epoch: list[int]
    test: Images  # MNIST's test set, raw (MNIST's own framing)
    images: torch.Tensor = field(init=False)  # every source's training images, one after another
    labels: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.images = torch.cat([source.train.images for source in self.sources])
        self.labels = torch.cat([source.train.labels for source in self.sources])

    @property
    def held_out(self) -> list[HeldOut]:
        return [source.held_out for source in self.sources if source.held_out is not None]

    @property
    def strokes(self) -> list[pendigits.PenDigit]:
        """Every source's training strokes: what the model of the strokes learns from."""
        return [digit for source in self.sources for digit in source.strokes]

    @property
    def feedback_until(self) -> int | None:
        return next((source.until for source in self.sources if source.until), None)


def load_data(config: TrainConfig, feedback_until: int | None = None) -> Data:
    """The sources `config.sources` names, in that order (see training/flags.py), and MNIST's test
    set; the feedback up to row `feedback_until` if given (a resumed run's)."""
    loaders = {"mnist": load_mnist, "pen": load_pen}
    found = [
        load_feedback(config, feedback_until) if name == "feedback" else loaders[name](config)
        for name in config.sources
    ]
    data = Data(found, per_epoch(found, config.epoch_size), mnist_test(config))
    log.info(
        "data: %d images per epoch (%s), %d MNIST test images from %s",
        sum(data.per_epoch),
        ", ".join(f"{n} {s.name}" for s, n in zip(found, data.per_epoch, strict=True)),
        len(data.test),
        config.data_dir,
    )
    return data


def per_epoch(sources: Sequence[Source], epoch_size: int | None = None) -> list[int]:
    """How many images each source gives an epoch of `epoch_size` images. A source with a share
    has that fraction of the images beside the sources before it (pen: 40% beside MNIST;
    feedback: its share of all); alone, or without a share, every image once. The default size
    is MNIST once plus the pen share (100,000 images): learning from feedback takes no longer.
    A smaller size (a short fine-tune) sees part of MNIST each epoch."""
    counts: list[int] = []
    for source in sources:
        before = sum(counts)
        if source.share is None or before == 0:
            counts.append(len(source.train))
        else:
            counts.append(round(before * source.share / (1 - source.share)))
    if epoch_size is None:
        epoch_size = sum(c for s, c in zip(sources, counts, strict=True) if s.name != "feedback")
    total = sum(counts)
    return [round(count * epoch_size / total) for count in counts] if epoch_size else counts


def epoch_order(
    sources: Sequence[Source], counts: Sequence[int], seed: int, epoch: int
) -> torch.Tensor:
    """The shuffled indices of epoch `epoch` into the sources' training images, one after the
    other: `count` of each source's, all of them in order if that is all of a source without a
    share, else in a fresh random order (repeated if there are fewer). A function of the seed,
    so a resume can replay it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    chosen, start = [], 0
    for source, count in zip(sources, counts, strict=True):
        size = len(source.train)
        if source.share is None and count == size:
            picks = torch.arange(size)
        else:
            rounds = -(-count // size) if size else 0
            picks = torch.cat(
                [torch.randperm(size, generator=generator) for _ in range(rounds)]
                or [torch.arange(0)]
            )[:count]
        chosen.append(start + picks)
        start += size
    everything = torch.cat(chosen)
    return everything[torch.randperm(len(everything), generator=generator)]


# --- MNIST -------------------------------------------------------------------------------------


def _mnist_split(config: TrainConfig, split: str) -> Images:
    if config.download:
        mnist.download(config.data_dir)
    images, labels = mnist.load_split(config.data_dir, split)
    if config.limit:
        images, labels = images[: config.limit], labels[: config.limit]
    return Images(images, labels)


def load_mnist(config: TrainConfig) -> Source:
    return Source("mnist", _mnist_split(config, "train"), share=None)


def mnist_test(config: TrainConfig) -> Images:
    """MNIST's test set, raw (MNIST's own framing)."""
    return _mnist_split(config, "test")


# --- pen digits --------------------------------------------------------------------------------


def load_pen(config: TrainConfig) -> Source:
    if config.download:
        pendigits.download(config.pen_file)
    trained, held_out = pendigits.split_writers(
        pendigits.load(config.pen_file), config.held_out_writers
    )
    if config.limit:
        trained, held_out = trained[: config.limit], held_out[: config.limit]
    if not trained:
        raise DatasetError(f"{config.pen_file}: no digits left once writers are held out")
    renderings = cached_renderings(
        config.checkpoint_dir, trained, config.pen_views, config.seed, True, _strokes(config)
    )
    log.info(
        "pen digits: %d of %d writers for training (%d renderings), %d digits of writers %s "
        "held out",
        len(trained),
        len({digit.writer for digit in trained}),
        len(renderings),
        len(held_out),
        ",".join(map(str, config.held_out_writers)) or "none",
    )
    return Source(
        "pen",
        renderings,
        share=config.pen_share,
        held_out=pen_held_out(config, held_out),
        strokes=trained,
    )


def pen_held_out(
    config: TrainConfig, digits: Sequence[pendigits.PenDigit] | None = None
) -> HeldOut | None:
    """The held-out writers' digits, each drawn once with the app's brush (no variation)."""
    if digits is None:
        _, digits = pendigits.split_writers(
            pendigits.load(config.pen_file), config.held_out_writers
        )
        digits = digits[: config.limit] if config.limit else digits
    if not digits:
        return None
    drawn = cached_renderings(config.checkpoint_dir, digits, 1, config.seed, False)
    return HeldOut(
        drawn.images,
        drawn.labels,
        key="pen_held_out",
        title=f"pen digits, writers not trained on ({','.join(map(str, config.held_out_writers))})",
        about={"writers": list(config.held_out_writers)},
        trajectories=trajectories([digit.strokes for digit in digits], y_up=True),
    )


def _strokes(config: TrainConfig) -> pendigits.StrokeVariation | None:
    """The stroke-level variation of the training renderings: `--stroke-variation`'s odds."""
    return pendigits.STROKE_VARIATION if config.stroke_variation else None


def cached_renderings(
    cache_dir: Path,
    digits: Sequence[pendigits.PenDigit],
    views: int,
    seed: int,
    vary: bool,
    strokes: pendigits.StrokeVariation | None = None,
) -> Images:
    """`pendigits.render_for_training`, kept in `cache_dir`: a resumed run does not draw them
    again. The file name holds a digest of everything the renderings depend on."""
    if not digits:
        return Images.empty()
    digest = hashlib.sha256(repr((pendigits.RENDERING, seed, views, vary, strokes)).encode())
    for digit in digits:
        digest.update(bytes([digit.label]))
        for stroke in digit.strokes:
            digest.update(stroke.tobytes() + b"|")
    path = cache_dir / f"pen-renderings-{digest.hexdigest()[:16]}.pt"
    try:
        cached = torch.load(path, weights_only=True)
        log.info("pen renderings from %s", path)
        return Images(cached["images"], cached["labels"])
    except FileNotFoundError:
        pass
    except Exception as exc:  # a damaged cache is drawn again, never fatal
        log.warning("ignoring damaged cache %s: %s", path.name, exc)
    started = time.perf_counter()
    images, labels = pendigits.render_for_training(
        digits, views, seed=seed, vary=vary, strokes=strokes
    )
    log.info(
        "drew %d pen renderings in %.0f s (cached in %s)",
        len(images),
        time.perf_counter() - started,
        path,
    )
    with atomic_file(path) as handle:
        torch.save({"images": images, "labels": labels}, handle)
    return Images(images, labels)


# --- feedback: the app's answered drawings -----------------------------------------------------


@dataclass(frozen=True)
class AnsweredDrawing:
    """One answered drawing as training reads it back: the answer (`predictions`) and the drawing
    it answers (`drawings`; the row the app stored as a `schema.Drawing`)."""

    id: int  # predictions.id
    submission_id: object  # uuid.UUID or None
    label: int  # the true label the person gave
    predicted: int  # what the model said
    strokes: tuple[np.ndarray, ...]  # each (n, 2) float: canvas pixels, x right, y down
    image: np.ndarray  # (28, 28) uint8: what the model read

    @property
    def held_out(self) -> bool:
        return is_held_out(self.submission_id, self.id)

    def as_pen_digit(self) -> pendigits.PenDigit:
        """The drawing as a pen digit (y up, as a tablet records it), to draw as pen digits are
        drawn."""
        return pendigits.PenDigit(
            self.label, writer=-1, strokes=tuple(stroke * (1.0, -1.0) for stroke in self.strokes)
        )


def read_feedback(conninfo: str, until: int | None = None) -> list[AnsweredDrawing]:
    """The answered drawings in the database at `conninfo` (rows up to id `until`), in the order
    they were stored. Raises FeedbackError if the database cannot be read."""
    try:
        with psycopg.connect(conninfo, connect_timeout=db.CONNECT_TIMEOUT_S) as conn:
            rows = conn.execute(FEEDBACK_QUERY, {"until": until}).fetchall()
    except psycopg.errors.UndefinedTable as exc:
        raise FeedbackError(
            f"the database has no drawings table ({exc}): the app stores drawings once its "
            f"schema is upgraded (`python db.py migrate`, or start the app once)"
        ) from exc
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        raise FeedbackError(
            f"cannot read the app's drawings: database unreachable ({reason}). Check "
            f"DATABASE_URL or the POSTGRES_* variables (the owner's: POSTGRES_USER, "
            f"POSTGRES_PASSWORD), or train without --sources feedback"
        ) from exc
    drawings, skipped = [], 0
    for row_id, submission_id, label, predicted, _, strokes, _, _, image in rows:
        lines = tuple(
            np.asarray(stroke, dtype=np.float64)
            for stroke in strokes or ()
            if isinstance(stroke, list) and stroke
        )
        if not lines or any(line.ndim != 2 or line.shape[1] != 2 for line in lines):
            skipped += 1
            continue
        pixels = np.frombuffer(bytes(image), dtype=np.uint8)
        if pixels.size != 28 * 28:
            skipped += 1
            continue
        drawings.append(
            AnsweredDrawing(row_id, submission_id, label, predicted, lines, pixels.reshape(28, 28))
        )
    if skipped:
        log.warning("skipped %d stored drawings that are not lists of [x, y] points", skipped)
    return drawings


def load_feedback(config: TrainConfig, until: int | None = None) -> Source:
    drawings = read_feedback(db.resolve_conninfo(owner=True), until)
    if config.limit:
        drawings = drawings[: config.limit]
    trained = [d for d in drawings if not d.held_out]
    if not trained:
        raise FeedbackError(
            f"the app's database holds {len(drawings)} answered drawings and none to train on "
            f"(1 in {HELD_OUT_BUCKETS} is held out): answer some on the Draw page first, or "
            f"train without --sources feedback"
        )
    renderings = cached_renderings(
        config.checkpoint_dir,
        [d.as_pen_digit() for d in trained],
        config.feedback_views,
        config.seed,
        True,
        _strokes(config),
    )
    held_out = feedback_held_out(drawings)
    log.info(
        "feedback: %d answered drawings, %d for training (%d renderings), %d held out",
        len(drawings),
        len(trained),
        len(renderings),
        len(held_out),
    )
    return Source(
        "feedback",
        renderings,
        share=config.feedback_share,
        held_out=held_out if len(held_out) else None,
        until=max(d.id for d in drawings),
        strokes=[d.as_pen_digit() for d in trained],
    )


def feedback_held_out(drawings: Sequence[AnsweredDrawing]) -> HeldOut:
    """The held-out drawings as the model read them (their stored 28x28 images)."""
    kept = [d for d in drawings if d.held_out]
    images = torch.from_numpy(np.stack([d.image for d in kept])) if kept else None
    return HeldOut(
        images if images is not None else Images.empty().images,
        torch.tensor([d.label for d in kept], dtype=torch.int64),
        key="feedback_held_out",
        title="people's drawings not trained on",
        about={"drawings": len(kept), "submissions_held_out": f"1 in {HELD_OUT_BUCKETS}"},
        trajectories=trajectories([d.strokes for d in kept]) if kept else None,
    )


def trajectories(strokes: Sequence[Sequence[np.ndarray]], y_up: bool = False) -> torch.Tensor:
    """Each drawing's trajectory, its strokes as the app hands them to the model of the strokes
    (`utils.trajectory`), stacked: (N, 5, points). *strokes*: each drawing's strokes, y down as
    the canvas gives them (`y_up`: as a tablet records them)."""
    flip = np.array([1.0, -1.0 if y_up else 1.0])
    return torch.from_numpy(
        np.stack([utils.trajectory_features([s * flip for s in lines]) for lines in strokes])
    )
