"""The digit classifier: the CNN, loading its weights, and predicting."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_PATH = PROJECT_DIR / "models" / "model.pth"
TRAIN_COMMAND = "python train.py --download"
MEMBER_KEY = re.compile(r"^members\.(\d+)\.(.+)$")  # members.<index>.<the member's key>
COUNT_KEY = "member_count"
MAX_MEMBERS = 16  # more in a file is a corrupt file, not an ensemble to build


class ConvNet(nn.Module):
    """One member: a small, fast CNN for 28x28 digits, three conv blocks (24, 48, 96 channels,
    61k parameters), each halving the resolution; wider than it was (16, 32, 64) since it learns
    pen handwriting beside MNIST (README, Training). Its output: logits."""

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(1, 24, kernel_size=5),
            _conv_block(24, 48, kernel_size=3),
            _conv_block(48, 96, kernel_size=3),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(96 * 3 * 3, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitCNN(nn.Module):
    """The classifier: `members` ConvNets, each from its own random start, read as one.

    The ensemble's answer is the mean of its members' *probabilities*, not of their logits:
    each member's softmax is calibrated on its own (a 90% answer is right about 90% of the
    time), and a mean of calibrated probabilities stays a probability of the same scale, while
    a mean of logits is a geometric mean of the probabilities, sharper than any member when they
    agree (overconfident) and driven by the member with the largest logits when they do not.
    `forward` returns the log of that mean, so that softmax, argmax and cross-entropy of its
    output are those of the averaged probabilities; with one member it returns the member's
    logits, exactly the single network of before.

    Weights: a state_dict with keys ``members.<i>.<layer>`` and ``member_count``, the number of
    members it holds (`load_weights` checks each is there). A file of the single network from
    before the ensemble (keys ``features.*``, ``classifier.*``) loads as one member. Trains in a
    few minutes per member on two CPU cores; predicts one digit in under a millisecond per member.
    """

    def __init__(self, members: int = 1, dropout: float = 0.3) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, not {members}")
        self.members = nn.ModuleList(ConvNet(dropout) for _ in range(members))
        # In the weights file: how many members it must hold (a member lost is an error).
        self.register_buffer(COUNT_KEY, torch.tensor(members))

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits, stacked: (members, N, 10). Training sums their losses."""
        return torch.stack([member(x) for member in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](x)
        return combine(self.member_logits(x))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(as_members(state_dict), strict=strict, assign=assign)


def combine(member_logits: torch.Tensor) -> torch.Tensor:
    """The ensemble's output from stacked member logits (members, N, 10): the log of the mean of
    their probabilities (one member: its logits as they are)."""
    if len(member_logits) == 1:
        return member_logits[0]
    log_probabilities = torch.log_softmax(member_logits, dim=-1)
    return torch.logsumexp(log_probabilities, dim=0) - math.log(len(member_logits))


def as_members(state_dict: dict) -> dict:
    """A state_dict of this network: the single network's (from before the ensemble: keys
    ``features.*``, ``classifier.*``) becomes one member; any other is returned as it is."""
    if any(key.startswith("members.") or key == COUNT_KEY for key in state_dict):
        return state_dict
    return {COUNT_KEY: torch.tensor(1), **{f"members.0.{k}": v for k, v in state_dict.items()}}


def _conv_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


@dataclass(frozen=True)
class Prediction:
    digit: int
    confidence: float
    probabilities: tuple[float, ...]


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, or does not fit the network."""


def model_path() -> Path:
    """Where the app finds its weights: `MODEL_PATH` if set, else models/model.pth."""
    return Path(os.environ.get("MODEL_PATH") or DEFAULT_MODEL_PATH)


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitCNN:
    """Load a state_dict saved by train.py into a DigitCNN in eval mode."""
    path = Path(path) if path is not None else model_path()
    if not path.is_file():
        raise ModelLoadError(
            f"No model file at {path}. Train one with `{TRAIN_COMMAND}` "
            f"(writes models/model.pth), or set MODEL_PATH to an existing file."
        )
    remedy = f" Delete it and train a new one with `{TRAIN_COMMAND}`."
    return load_weights(path, f"The model file {path}", remedy, device)


def load_weights(
    source: str | Path | BinaryIO,
    what: str,
    remedy: str = "",
    device: str | torch.device = "cpu",
) -> DigitCNN:
    """A DigitCNN in eval mode from a state_dict's file (a path or a binary file object, read
    with ``weights_only=True``); ModelLoadError naming *what*, *remedy* appended, if it is not
    one that fits this network."""
    try:
        state_dict = torch.load(source, map_location=device, weights_only=True)
    except Exception as exc:  # torch.load raises many types for bad bytes; all mean the same
        raise ModelLoadError(f"{what} is corrupt or not a state_dict ({exc}).{remedy}") from exc
    if not isinstance(state_dict, dict):
        raise ModelLoadError(f"{what} holds a {type(state_dict).__name__}, not a state_dict.")
    state_dict = as_members(state_dict)
    model = DigitCNN(_check_members(state_dict, what, remedy))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{what} does not match this network's architecture: {exc}.{remedy}"
        ) from exc
    return model.to(device).eval()


def _check_members(state_dict: dict, what: str, remedy: str) -> int:
    """How many members a state_dict (`as_members`) holds, as its ``member_count`` says, after
    checking that it holds each of them whole, in finite numbers; ModelLoadError naming *what*
    and the member if not."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(
                f"{what} is corrupt: its entry {key!r} is a {type(value).__name__}, not a tensor."
                f"{remedy}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ModelLoadError(f"{what} is corrupt: {key} holds NaN or infinite values.{remedy}")
    count = state_dict.get(COUNT_KEY)
    if count is None or count.numel() != 1 or count.is_floating_point():
        raise ModelLoadError(
            f"{what} does not match this network's architecture: no {COUNT_KEY} (an integer) "
            f"saying how many members it holds.{remedy}"
        )
    members = int(count)
    if not 1 <= members <= MAX_MEMBERS:
        raise ModelLoadError(
            f"{what} is corrupt: it claims {members} members (1 to {MAX_MEMBERS}).{remedy}"
        )
    with torch.random.fork_rng(devices=[]):  # loading draws no more random numbers than before
        expected = ConvNet().state_dict().keys()
    unexpected = [
        key
        for key in state_dict
        if key != COUNT_KEY
        and not ((m := MEMBER_KEY.match(key)) and int(m[1]) < members and m[2] in expected)
    ]
    if unexpected:
        raise ModelLoadError(
            f"{what} does not match this network's architecture ({members} members): unexpected "
            f"keys {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}.{remedy}"
        )
    for index in range(members):
        missing = [k for k in expected if f"members.{index}.{k}" not in state_dict]
        if len(missing) == len(expected):
            raise ModelLoadError(
                f"{what} is incomplete: it holds an ensemble of {members} members, and member "
                f"{index} is missing.{remedy}"
            )
        if missing:
            raise ModelLoadError(
                f"{what} is incomplete: member {index} of {members} lacks "
                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}.{remedy}"
            )
    return members


def predict(model: nn.Module, batch: torch.Tensor) -> Prediction:
    """Predict the one digit in a (1, 1, 28, 28) batch, as `utils.preprocess` returns it."""
    if batch.shape[0] != 1:
        raise ValueError(f"predict takes one image; use predict_batch for {batch.shape[0]}.")
    return predict_batch(model, batch)[0]


def predict_batch(model: nn.Module, batch: torch.Tensor) -> list[Prediction]:
    """Predict every image of an (N, 1, 28, 28) batch."""
    if batch.ndim != 4 or tuple(batch.shape[1:]) != (1, 28, 28):
        raise ValueError(f"Expected a batch of shape (N, 1, 28, 28), got {tuple(batch.shape)}.")
    device = next(model.parameters()).device
    with torch.inference_mode():
        probabilities = torch.softmax(model(batch.to(device)), dim=1).cpu()
    confidences, digits = probabilities.max(dim=1)
    return [
        Prediction(digit=int(digit), confidence=float(confidence), probabilities=tuple(row))
        for digit, confidence, row in zip(
            digits.tolist(), confidences.tolist(), probabilities.tolist(), strict=True
        )
    ]
