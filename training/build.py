"""What a run starts from: the device, the network (new, --init's weights, or as a checkpoint
left it) and the optimizer and one-cycle schedule of each model it trains."""

from __future__ import annotations

import logging

import torch

import model as model_lib
from model import DigitCNN
from training import sources
from training.config import SetupError, TrainConfig
from training.loops import TRAJECTORY_BATCH, TRAJECTORY_LR

log = logging.getLogger("train")


def build(config: TrainConfig, data: sources.Data, device, state: dict | None):
    """The network, its optimizer and learning-rate schedule, and those of the model of the
    strokes (None without --trajectory-epochs): as the checkpoint `state` left them, or new (the
    network from --init's weights if given; the model of the strokes added if it has none and
    one is to be trained)."""
    if config.trajectory_epochs and not data.strokes:
        raise SetupError("--trajectory-epochs: no strokes to learn from (no pen digits)")
    if state:
        net = DigitCNN(config.members, trajectory=model_lib.TRAJECTORY_KEY in state["model"])
    elif config.init:
        net = load_init(config)
        log.info("starting from the weights in %s (%d members)", config.init, config.members)
    else:
        net = DigitCNN(members=config.members)
    if config.trajectory_epochs and net.trajectory is None:
        net.add_trajectory()
    net = net.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        net.members.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        epochs=config.epochs,
        steps_per_epoch=-(-sum(data.per_epoch) // config.batch_size),
    )
    stroke_optimizer = stroke_scheduler = None
    if config.trajectory_epochs:
        stroke_optimizer = torch.optim.AdamW(
            net.trajectory.parameters(), lr=TRAJECTORY_LR, weight_decay=1e-4
        )
        stroke_scheduler = torch.optim.lr_scheduler.OneCycleLR(
            stroke_optimizer,
            max_lr=TRAJECTORY_LR,
            epochs=config.trajectory_epochs,
            steps_per_epoch=-(-len(data.strokes) // TRAJECTORY_BATCH),
        )
    if state:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if stroke_optimizer:
            stroke_optimizer.load_state_dict(state["trajectory_optimizer"])
            stroke_scheduler.load_state_dict(state["trajectory_scheduler"])
        torch.set_rng_state(state["rng"])
        log.info(
            "resuming from epoch %d step %d (%s): continuing with epoch %d/%d",
            state["epoch"],
            state["step"],
            state["path"].name,
            state["epoch"] + 1,
            config.epochs,
        )
    elif not config.fresh:
        log.info("no checkpoint in %s: starting from scratch", config.checkpoint_dir)
    return net, optimizer, scheduler, stroke_optimizer, stroke_scheduler


def load_init(config: TrainConfig) -> DigitCNN:
    """--init's model; refused if --members asks for another count than it holds (a fine-tune
    trains them all: its members are the run's)."""
    try:
        net = model_lib.load_model(config.init)
    except model_lib.ModelLoadError as exc:
        raise SetupError(f"--init {config.init}: {exc}") from exc
    if config.members not in (None, len(net.members)):
        raise SetupError(
            f"--init {config.init} holds {len(net.members)} members, not --members "
            f"{config.members}: leave --members out to fine-tune them all"
        )
    return net


def select_device(name: str) -> torch.device:
    """--device: "auto" is CUDA where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"--device {name}: CUDA is not available on this machine")
    return device
