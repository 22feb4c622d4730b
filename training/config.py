"""A training run's settings: `TrainConfig`, one field per flag of train.py, and its two presets.

The presets hold the settings a fine-tune does differently from a run from scratch; every other
setting has one default, the field's. A setting given (not None) always wins:

    TrainConfig.from_settings()                             # "from scratch": SCRATCH
    TrainConfig.from_settings(init=Path("models/model.pth"))  # "fine-tune": FINE_TUNE
    TrainConfig.from_settings(init=..., lr=0.01)            # the fine-tune, at another rate

A config that cannot run is refused when it is made (`ConfigError`, the message names the flag);
train.py's command line shows it as its usage error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mnist
import pendigits
from model import MAX_MEMBERS

FEEDBACK_SHARE = 0.3  # measured: docs/experiments.md, "The fine-tune's defaults"
MEMBERS = 1  # from scratch: the ensemble's size (--members: docs/training.md, "An ensemble")
# From scratch: --epochs, --lr, --epoch-size. A fine-tune (--init, the feedback loop's run) has
# its own defaults, measured with `python -m lab.evaluate --simulate-people`
# (docs/experiments.md, "The fine-tune's defaults"); it keeps the live model's BatchNorm
# statistics (--freeze-bn).
SCRATCH = {
    "epochs": 12, "lr": 0.05, "epoch_size": None, "pen_share": 0.4, "feedback_views": 8,
    "distill": 0.0, "trajectory_epochs": 40, "freeze_bn": False,
}  # fmt: skip
# A fine-tune keeps --init's model of the strokes as it is unless --trajectory-epochs says more.
FINE_TUNE = {
    "epochs": 2, "lr": 0.005, "epoch_size": 20_000, "pen_share": 0.2, "feedback_views": 16,
    "distill": 0.0, "trajectory_epochs": 0, "freeze_bn": True,
}  # fmt: skip
PRESETS = {"from scratch": SCRATCH, "fine-tune": FINE_TUNE}
# Settings a checkpoint must share with the current run to be resumed by it.
RUN_SETTINGS = (
    "epochs", "batch_size", "lr", "seed", "limit",
    "sources", "pen_share", "pen_views", "held_out_writers",
    "feedback_share", "feedback_views", "init", "epoch_size", "freeze_bn",
    "distill", "members", "stroke_variation", "trajectory_epochs",
)  # fmt: skip


class ConfigError(ValueError):
    """Settings that cannot run together; the message says which flag and why."""


class SetupError(RuntimeError):
    """The run cannot start as asked (bad device, checkpoints of another run); no traceback."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, as train.py's flags name them (`--batch-size`:
    `batch_size`); the defaults are a run from scratch's (SCRATCH)."""

    epochs: int = SCRATCH["epochs"]  # passes of the image CNN over the training set
    batch_size: int = 128
    lr: float = SCRATCH["lr"]  # peak learning rate, one-cycle
    seed: int = 1
    data_dir: Path = field(default_factory=mnist.data_dir_from_env)  # MNIST's four files
    sources: tuple[str, ...] = ("mnist", "pen")  # sources.NAMES, in the order trained on
    pen_file: Path = field(default_factory=pendigits.default_path)
    pen_share: float = SCRATCH["pen_share"]  # of each epoch's images, beside MNIST
    pen_views: int = 4  # renderings of each pen digit
    stroke_variation: bool = False  # pendigits.vary_strokes in the renderings
    held_out_writers: tuple[int, ...] = pendigits.HELD_OUT_WRITERS
    feedback_share: float = FEEDBACK_SHARE  # of each epoch's images, beside the other sources
    feedback_views: int = SCRATCH["feedback_views"]  # renderings of each drawing
    members: int | None = None  # None: MEMBERS, or as many as --init holds (train.py decides)
    trajectory_epochs: int = SCRATCH["trajectory_epochs"]  # then the model of the strokes
    init: Path | None = None  # the weights a fine-tune starts from
    epoch_size: int | None = SCRATCH["epoch_size"]  # None: sources.per_epoch's default
    distill: float = SCRATCH["distill"]  # weight of the loss that stays close to --init's model
    freeze_bn: bool = SCRATCH["freeze_bn"]  # keep BatchNorm's statistics
    promote: bool = False  # live only if registry.promotion finds it better
    report: Path | None = None  # with promote: the verdict and comparison, as JSON
    download: bool = False  # fetch MNIST and the pen digits if missing
    out: Path = Path("models/model.pth")
    checkpoint_dir: Path = Path("models/checkpoints")
    keep: int = 3  # checkpoints kept
    fresh: bool = False  # ignore existing checkpoints
    limit: int | None = None  # train on the first N images of each source
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    threads: int | None = None  # CPU threads (None: all)
    log_every: float = 5.0  # seconds between progress lines

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.keep < 1:
            raise ConfigError("--epochs, --batch-size and --keep must be >= 1 and --lr > 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be >= 1")
        if self.epoch_size is not None and self.epoch_size < 1:
            raise ConfigError("--epoch-size must be >= 1")
        if not 0 < self.pen_share < 1 or self.pen_views < 1:
            raise ConfigError("--pen-share must be between 0 and 1 (exclusive), --pen-views >= 1")
        if not 0 < self.feedback_share < 1 or self.feedback_views < 1:
            raise ConfigError(
                "--feedback-share must be between 0 and 1 (exclusive), --feedback-views >= 1"
            )
        if self.trajectory_epochs < 0:
            raise ConfigError("--trajectory-epochs must be >= 0")
        if self.members is not None and not 1 <= self.members <= MAX_MEMBERS:
            raise ConfigError(f"--members must be between 1 and {MAX_MEMBERS}")
        if self.report is not None and not self.promote:
            raise ConfigError("--report needs --promote (it reports the promotion's verdict)")
        if self.distill < 0 or (self.distill and not self.init):
            raise ConfigError(
                "--distill must be >= 0, and needs --init (the model to stay close to)"
            )

    @classmethod
    def from_settings(cls, **given: object) -> TrainConfig:
        """The settings `given` (None: not given, as argparse leaves a flag left out), the
        others from the run's preset (FINE_TUNE with `init`, else SCRATCH) or their defaults.
        With MNIST alone among the sources there are no strokes to learn from: no
        --trajectory-epochs (asking for some is an error)."""
        given = {name: value for name, value in given.items() if value is not None}
        settings = {**preset(given.get("init")), **given}
        sources = settings.get("sources", cls.sources)
        if not {"pen", "feedback"} & set(sources):  # MNIST alone: no strokes to learn from
            if given.get("trajectory_epochs"):
                raise ConfigError(
                    "--trajectory-epochs needs strokes: pen or feedback among --sources"
                )
            settings["trajectory_epochs"] = 0
        return cls(**settings)

    def run_settings(self) -> dict:
        """The RUN_SETTINGS as a checkpoint stores them (lists, not tuples; paths as strings)."""
        return {name: _plain(getattr(self, name)) for name in RUN_SETTINGS}


def preset(init: Path | None) -> dict:
    """The preset a run takes its defaults from: "fine-tune" with --init, else "from scratch"."""
    return PRESETS["fine-tune" if init else "from scratch"]


def _plain(value: object) -> object:
    """A setting as a checkpoint stores it (lists, not tuples; a path as a string)."""
    if isinstance(value, tuple | Path):
        return list(value) if isinstance(value, tuple) else str(value)
    return value
