"""The training loops: an epoch of the image CNN (`train_one_epoch`), an epoch of the model of the
strokes (`train_trajectory_epoch`, its inputs written anew each epoch by `trajectory_inputs`).

Both start where `Progress` says (a resumed epoch starts mid-way) and count their steps in it,
and both stop at a step boundary when `StopFlag` has seen SIGTERM or SIGINT (`StopRequested`):
the caller checkpoints the step reached.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import augment
import model as model_lib
import pendigits
import utils
from training.config import TrainConfig

log = logging.getLogger("train")

# The model of the strokes' training, chosen by leave-writers-out cross-validation
# (docs/experiments.md, "How the model of the strokes was chosen").
TRAJECTORY_BATCH = 64
TRAJECTORY_LR = 3e-3
TRAJECTORY_STREAM = 7  # its random numbers: a stream of their own, beside the renderings'
DISTILL_T = 2.0  # the temperature of --distill's soft targets


@dataclass
class Progress:
    """Where training is: `epoch` epochs complete, `step` steps of the next one done."""

    epoch: int
    step: int


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived; the run stops at the next step boundary."""


@dataclass
class StopFlag:
    signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        # A second signal is not ignored: it gets the default behaviour.
        signal.signal(signum, signal.SIG_DFL)

    def check(self) -> None:
        if self.signal_name:
            raise StopRequested(self.signal_name)


def memory_mb() -> tuple[float, float]:
    """Resident set size and its peak for this process, in MB (Linux /proc)."""
    values = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def train_one_epoch(
    net,
    loader,
    optimizer,
    scheduler,
    device,
    config: TrainConfig,
    progress: Progress,
    steps_per_epoch,
    stop: StopFlag,
    teacher=None,
) -> None:
    """Train from `progress.step` to the end of epoch `progress.epoch`, counting steps."""
    epoch = progress.epoch
    net.train()
    if config.freeze_bn:  # a fine-tune: the live model's BatchNorm statistics, not this batch's
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    last_log = time.perf_counter()
    samples, loss_sum, correct = 0, 0.0, 0
    for images, labels, feedback in loader:
        stop.check()
        images = images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)
        labels = labels.to(device, non_blocking=True)
        images = augment.augment(augment.flag_ones(images, labels))
        inputs = images.sub_(utils.MNIST_MEAN).div_(utils.MNIST_STD)
        inputs = inputs.contiguous(memory_format=torch.channels_last)

        member_logits = net.member_logits(inputs)  # each member learns on its own: losses summed
        loss = sum(F.cross_entropy(logits, labels) for logits in member_logits)
        logits = model_lib.combine(member_logits)  # the ensemble's answer, as predict reads it
        if teacher is not None and (kept := ~feedback.to(device)).any():
            with torch.no_grad():
                target = F.log_softmax(teacher(inputs[kept]) / DISTILL_T, 1)
            student = F.log_softmax(logits[kept] / DISTILL_T, 1)
            kl = F.kl_div(student, target, reduction="batchmean", log_target=True)
            loss = loss + config.distill * DISTILL_T**2 * kl * kept.float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.step += 1
        step = progress.step

        samples += len(labels)
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        now = time.perf_counter()
        if now - last_log >= config.log_every or step == steps_per_epoch:
            rss, _ = memory_mb()
            log.info(
                "epoch %d/%d step %d/%d loss %.4f acc %.2f%% %.0f samples/s rss %.0f MB",
                epoch + 1,
                config.epochs,
                step,
                steps_per_epoch,
                loss_sum / samples,
                100 * correct / samples,
                samples / (now - last_log),
                rss,
            )
            last_log, samples, loss_sum, correct = now, 0, 0.0, 0


def trajectory_inputs(digits: Sequence[pendigits.PenDigit], seed: int, epoch: int) -> torch.Tensor:
    """The inputs of the model of the strokes for one epoch, trajectories (N, 5, points): each
    digit's strokes as another person might write them (`pendigits.vary_strokes`: order,
    direction, pen lifts, open tops, closed loops), placed on the canvas as another person or
    device might (`pendigits.on_canvas`: slant, rotation, stretch, each stroke a little off,
    tremor), then read as the app reads a drawing (`utils.trajectory_features`). Digit i of
    epoch e depends only on (seed, e, i): a resumed epoch is the same."""
    out = np.empty((len(digits), utils.TRAJECTORY_FEATURES, utils.TRAJECTORY_POINTS), np.float32)
    for i, digit in enumerate(digits):
        rng = np.random.default_rng((seed, epoch, i, TRAJECTORY_STREAM))
        lines, _ = pendigits.on_canvas(
            pendigits.vary_strokes(digit.strokes, digit.label, rng), rng, vary=True
        )
        out[i] = utils.trajectory_features(lines)
    return torch.from_numpy(out)


def train_trajectory_epoch(
    net: model_lib.TrajectoryNet,
    digits: Sequence[pendigits.PenDigit],
    labels: torch.Tensor,
    optimizer,
    scheduler,
    device,
    config: TrainConfig,
    progress: Progress,
    stop: StopFlag,
) -> None:
    """Train the model of the strokes `net` on `digits` from `progress.step` to the end of epoch
    `progress.epoch` (counted after the CNN's `config.epochs`), counting steps."""
    epoch = progress.epoch - config.epochs
    inputs = trajectory_inputs(digits, config.seed, epoch)
    order = torch.from_numpy(np.random.default_rng((config.seed, epoch)).permutation(len(digits)))
    steps = -(-len(digits) // TRAJECTORY_BATCH)
    net.train()
    last_log = time.perf_counter()
    samples, loss_sum, correct = 0, 0.0, 0
    for step in range(progress.step, steps):
        stop.check()
        batch = order[step * TRAJECTORY_BATCH : (step + 1) * TRAJECTORY_BATCH]
        target = labels[batch].to(device)
        logits = net(inputs[batch].to(device))
        loss = F.cross_entropy(logits, target, label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.step = step + 1
        samples += len(batch)
        loss_sum += loss.item() * len(batch)
        correct += int((logits.argmax(1) == target).sum())
        now = time.perf_counter()
        if now - last_log >= config.log_every or progress.step == steps:
            log.info(
                "trajectory epoch %d/%d step %d/%d loss %.4f acc %.2f%% %.0f samples/s rss %.0f MB",
                epoch + 1,
                config.trajectory_epochs,
                progress.step,
                steps,
                loss_sum / samples,
                100 * correct / samples,
                samples / (now - last_log),
                memory_mb()[0],
            )
            last_log, samples, loss_sum, correct = now, 0, 0.0, 0
