"""Train the digit CNN on MNIST, real pen handwriting and the app's own answered drawings, then
the model of their strokes beside it, checkpointing every epoch so that no crash loses progress.

    python train.py --download          # full run with the defaults: minutes on 2 CPU cores
    python train.py --limit 2000 --epochs 2 --out /tmp/m.pth --checkpoint-dir /tmp/ckpt
    python train.py --sources mnist     # MNIST alone, as before pen digits
    python train.py --sources mnist,pen,feedback --init models/model.pth --promote
                                        # fine-tune the live model on people's drawings too
                                        # (--init: the fine-tune defaults, FINE_TUNE)

First `--epochs` epochs of the image CNN, then `--trajectory-epochs` epochs of the model of the
strokes (model.TrajectoryNet) on the strokes of the pen digits and people's drawings, each epoch
written and placed anew (`training.loops.trajectory_inputs`). The data comes from
`training/sources.py`.
The held-out part of each source (pen writers, a fifth of the people's drawings) is never
trained on; the model's accuracy on it, per digit and with its worst confusions, goes to the log
and to model.json. With `--promote`, the new model replaces the live one only if
`registry.promotion.promote` finds it better by the promotion rule (exit code
`registry.promotion.EXIT_REFUSED` otherwise; docs/promotion.md).

The settings are a `training.config.TrainConfig`; the pieces are in the `training` package
(its docstring lists them).

Kill it at any moment (SIGKILL, OOM, power loss) and run the same command again: it resumes from
the newest checkpoint that loads. SIGTERM or Ctrl-C (what `docker stop` sends) saves a checkpoint
of the epoch in progress first, then exits with code 143.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import db
import mnist
import model as model_lib
from training import flags, metrics, sources
from training.build import build, load_init, select_device
from training.checkpoints import load_newest_checkpoint, save_checkpoint
from training.config import MEMBERS, ConfigError, SetupError, TrainConfig
from training.loops import (
    Progress,
    StopFlag,
    StopRequested,
    memory_mb,
    train_one_epoch,
    train_trajectory_epoch,
)
from training.model_file import Trained, write_model
from training.promote import candidate_path, promote

log = logging.getLogger("train")

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_TERMINATED = 143


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a TrainConfig: the flags given (training/flags.py), the others from
    the preset (FINE_TUNE with --init, else SCRATCH) or TrainConfig's defaults."""
    parser = flags.parser(description=__doc__.split("\n\n")[0])
    try:
        return TrainConfig.from_settings(**vars(parser.parse_args(argv)))
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    sys.stdout.reconfigure(line_buffering=True)
    config = parse_args(argv)
    stop = StopFlag()
    stop.install()
    try:
        trained = train(config, stop)
        return promote(config, trained) if config.promote else 0
    except StopRequested:
        return EXIT_TERMINATED
    except (mnist.DatasetError, SetupError, db.DatabaseUnavailable) as exc:
        log.error("training stopped: %s", exc)
        return EXIT_BAD_INPUT
    except BaseException:
        log.exception(
            "training crashed; the newest checkpoint in %s is kept: run the same command to resume",
            config.checkpoint_dir,
        )
        return EXIT_ERROR


def train(config: TrainConfig, stop: StopFlag) -> Trained:
    """Build (or resume), the image CNN's epochs, those of the model of the strokes, the final
    figures, the model written: a checkpoint after each epoch, and of the step reached if
    stopped."""
    started = time.perf_counter()
    device = select_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    # The members (--init's, all fine-tuned; else --members or MEMBERS): the checkpoints name them.
    members = len(load_init(config).members) if config.init else config.members or MEMBERS
    config = replace(config, members=members)
    torch.manual_seed(config.seed)
    log.info(
        "torch %s on %s with %d threads; pid %d",
        torch.__version__,
        device,
        torch.get_num_threads(),
        os.getpid(),
    )
    settings = config.run_settings()
    if config.fresh:
        log.info("--fresh: ignoring checkpoints in %s", config.checkpoint_dir)
    state = None if config.fresh else load_newest_checkpoint(config.checkpoint_dir, settings)
    # A resume trains on the drawings the interrupted run read, not on those stored since.
    data = sources.load_data(config, feedback_until=state.get("feedback_until") if state else None)
    net, optimizer, scheduler, stroke_optimizer, stroke_scheduler = build(
        config, data, device, state
    )
    history, trained_seconds = (state["history"], state["trained_seconds"]) if state else ([], 0)
    progress = Progress(epoch=state["epoch"], step=state["step"]) if state else Progress(0, 0)

    def checkpoint(epoch: int, step: int) -> Path:
        state = {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **(
                {
                    "trajectory_optimizer": stroke_optimizer.state_dict(),
                    "trajectory_scheduler": stroke_scheduler.state_dict(),
                }
                if stroke_optimizer
                else {}
            ),
            "rng": torch.get_rng_state(),
            "epoch": epoch,
            "step": step,
            "settings": settings,
            "feedback_until": data.feedback_until,
            "history": history,
            "trained_seconds": trained_seconds + time.perf_counter() - session_start,
        }
        return save_checkpoint(state, config.checkpoint_dir, config.keep)

    # Which images are people's drawings: --distill keeps the --init model's answers on the rest.
    is_feedback = torch.cat(
        [torch.full((len(s.train.labels),), s.name == "feedback") for s in data.sources]
    )
    dataset = TensorDataset(data.images, data.labels, is_feedback)
    teacher = None
    if config.distill:
        teacher = model_lib.load_model(config.init).to(device).eval()
        teacher = teacher.to(memory_format=torch.channels_last)
    steps_per_epoch = -(-sum(data.per_epoch) // config.batch_size)
    session_start = time.perf_counter()

    def epoch_done(summary: str) -> None:
        """Log the epoch just done (`summary`, then memory and time), checkpoint it."""
        rss, peak = memory_mb()
        seconds = trained_seconds + time.perf_counter() - session_start
        log.info("%s, rss %.0f MB (peak %.0f MB), %.0f s so far", summary, rss, peak, seconds)
        progress.step = 0
        log.info("checkpoint saved: %s", checkpoint(progress.epoch + 1, 0))

    try:
        for epoch in range(progress.epoch, config.epochs):
            progress.epoch = epoch
            order = sources.epoch_order(data.sources, data.per_epoch, config.seed, epoch)
            loader = DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=order[progress.step * config.batch_size :].tolist(),
                num_workers=config.workers,
                persistent_workers=False,
            )
            train_one_epoch(
                net, loader, optimizer, scheduler, device, config, progress, steps_per_epoch, stop,
                teacher,
            )  # fmt: skip
            history.append(figures := metrics.epoch_figures(net, data, device, epoch))
            epoch_done(
                f"epoch {epoch + 1}/{config.epochs} done: test accuracy "
                f"{figures['test_accuracy']:.2%}"
                + "".join(f", {h.title} {figures[f'{h.key}_accuracy']:.2%}" for h in data.held_out)
                + f", lr {scheduler.get_last_lr()[0]:.4f}"
            )
        stroke_labels = torch.tensor([digit.label for digit in data.strokes], dtype=torch.int64)
        last = config.epochs + config.trajectory_epochs
        for epoch in range(max(progress.epoch, config.epochs), last):
            progress.epoch = epoch
            train_trajectory_epoch(
                net.trajectory, data.strokes, stroke_labels, stroke_optimizer, stroke_scheduler,
                device, config, progress, stop,
            )  # fmt: skip
            history.append(figures := metrics.trajectory_figures(net, data, device, epoch))
            epoch_done(
                f"trajectory epoch {epoch + 1 - config.epochs}/{config.trajectory_epochs} done"
                + "".join(
                    f", {h.title}: strokes alone {figures[f'{h.key}_strokes_accuracy']:.2%}, "
                    f"with the image {figures[f'{h.key}_accuracy']:.2%}"
                    for h in data.held_out
                    if h.trajectories is not None
                )
                + f", lr {stroke_scheduler.get_last_lr()[0]:.5f}"
            )
    except StopRequested as stopped:
        path = checkpoint(progress.epoch, progress.step)
        log.warning(
            "%s received: checkpoint of epoch %d step %d saved to %s (epochs after %d: the "
            "model of the strokes'); run the same command to resume",
            stopped,
            progress.epoch + 1,
            progress.step,
            path,
            config.epochs,
        )
        raise

    trained_seconds += time.perf_counter() - session_start
    log.info("training done in %.0f s; evaluating through utils.preprocess", trained_seconds)
    net = net.to(memory_format=torch.contiguous_format).eval().cpu()
    figures = metrics.final_figures(net, data)
    out = candidate_path(config) if config.promote else config.out
    info = write_model(net, config, data, figures, trained_seconds, started, out)
    return Trained(out, info, data)


if __name__ == "__main__":
    sys.exit(main())
