"""train.py's flags: each sets the TrainConfig field of its name (`--batch-size`: `batch_size`);
a flag left out is None, for the preset or the field's default (`TrainConfig.from_settings`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pendigits
from training import sources
from training.config import FINE_TUNE, MEMBERS, SCRATCH, TrainConfig


def parser(description: str) -> argparse.ArgumentParser:
    """The command line's flags, with their help and TrainConfig's defaults. A setting of the
    presets has none here (None: the preset's, which its help names)."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"passes over the training set (default {SCRATCH['epochs']}; with --init "
        f"{FINE_TUNE['epochs']})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="images per training step"
    )
    parser.add_argument(
        "--lr",
        type=float,
        help=f"peak learning rate, one-cycle (default {SCRATCH['lr']}; with --init "
        f"{FINE_TUNE['lr']})",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=defaults.data_dir,
        help="folder with the four MNIST *-ubyte.gz files (env MNIST_DIR)",
    )
    parser.add_argument(
        "--sources",
        type=_sources,
        default=",".join(defaults.sources),
        help="training data, comma-separated: mnist (scanned paper), pen (pen trajectories), "
        "feedback (the app's answered drawings, from its database: DATABASE_URL, POSTGRES_*)",
    )
    parser.add_argument(
        "--pen-file",
        type=Path,
        default=defaults.pen_file,
        help=f"the UNIPEN pen digits file (env PENDIGITS_DIR: the folder holding "
        f"{pendigits.FILE_NAME})",
    )
    parser.add_argument(
        "--pen-share",
        type=float,
        help="with both sources, the fraction of each epoch's images that are pen digits, beside "
        f"MNIST (default {SCRATCH['pen_share']}; with --init {FINE_TUNE['pen_share']})",
    )
    parser.add_argument(
        "--pen-views",
        type=int,
        default=defaults.pen_views,
        help="renderings of each pen digit, cached",
    )
    parser.add_argument(
        "--stroke-variation",
        action=argparse.BooleanOptionalAction,
        default=defaults.stroke_variation,
        help="pen and feedback renderings written another way now and then: strokes in another "
        "order or direction, pen lifts joined or split, tops open, loops closed "
        "(pendigits.vary_strokes; off: not confirmed by the held-out writers, "
        "docs/experiments.md)",
    )
    parser.add_argument(
        "--held-out-writers",
        type=_writers,
        default=",".join(map(str, defaults.held_out_writers)),
        help="pen writers kept out of training to measure the model on (or 'none')",
    )
    parser.add_argument(
        "--feedback-share",
        type=float,
        default=defaults.feedback_share,
        help="with feedback and another source, the fraction of each epoch's images that are "
        "renderings of the app's drawings (those not held out)",
    )
    parser.add_argument(
        "--feedback-views",
        type=int,
        help=f"renderings of each drawing (default {SCRATCH['feedback_views']}; with --init "
        f"{FINE_TUNE['feedback_views']})",
    )
    parser.add_argument(
        "--members",
        type=int,
        help=f"networks in the ensemble, trained together, each from its own random start; the "
        f"model averages their probabilities (model.DigitCNN; default {MEMBERS}; with --init: "
        f"as many as its file holds)",
    )
    parser.add_argument(
        "--trajectory-epochs",
        type=int,
        help="then passes of the model of the strokes (model.TrajectoryNet) over the pen "
        "digits' and people's strokes; 0: none, the image CNN alone (default "
        f"{SCRATCH['trajectory_epochs']} with pen or feedback among --sources; with --init "
        f"{FINE_TUNE['trajectory_epochs']}: its model of the strokes kept as it is)",
    )
    parser.add_argument("--init", type=Path, help="start from these weights: fine-tune")
    parser.add_argument(
        "--epoch-size",
        type=int,
        help="images per epoch (default: all MNIST images plus the pen share; with --init "
        f"{FINE_TUNE['epoch_size']:,})",
    )
    parser.add_argument(
        "--distill",
        type=float,
        help="with --init: weight of a distillation loss that keeps the model's answers on the "
        "MNIST and pen images close to the --init model's (learning without forgetting; 0: off)",
    )
    parser.add_argument(
        "--freeze-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep BatchNorm's statistics as they are (default: on with --init, a fine-tune)",
    )
    parser.add_argument(
        "--promote",
        action="store_true",
        help="live only if better by the promotion rule (registry/promotion.py)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="with --promote: the verdict and the comparison written to this JSON file",
    )
    parser.add_argument(
        "--download", action="store_true", help="fetch MNIST and the pen digits if missing"
    )
    parser.add_argument("--out", type=Path, default=defaults.out, help="final model")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=defaults.checkpoint_dir, help="checkpoints"
    )
    parser.add_argument("--keep", type=int, default=defaults.keep, help="checkpoints kept")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument(
        "--limit", type=int, default=defaults.limit, help="train on the first N images"
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, help="DataLoader worker processes"
    )
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="CPU threads (default: all)"
    )
    parser.add_argument(
        "--log-every", type=float, default=defaults.log_every, help="seconds between lines"
    )
    return parser


def _sources(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names or set(names) - set(sources.NAMES):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(sources.NAMES)}")
    return names


def _writers(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: writer ids, comma-separated") from None
