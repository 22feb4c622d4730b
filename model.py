"""The digit classifier: the CNN over the image, beside it the model of the strokes
(`TrajectoryNet`), loading their weights (one file), and predicting."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

import settings
import utils

DEFAULT_MODEL_PATH = settings.DEFAULT_MODEL_PATH  # models/model.pth in the project
TRAIN_COMMAND = "python train.py --download"
MEMBER_KEY = re.compile(r"^members\.(\d+)\.(.+)$")  # members.<index>.<the member's key>
COUNT_KEY = "member_count"
TRAJECTORY_PREFIX = "trajectory."  # the model of the strokes' keys: trajectory.<its key>
TRAJECTORY_KEY = "trajectory_points"  # in a file holding one: the points it reads
MAX_MEMBERS = 16  # more in a file is a corrupt file, not an ensemble to build


class ConvNet(nn.Module):
    """One member: a small, fast CNN for 28x28 digits, three conv blocks (24, 48, 96 channels,
    61k parameters), each halving the resolution; wider than it was (16, 32, 64) since it learns
    pen handwriting beside MNIST (docs/training.md). Its output: logits."""

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


class TrajectoryNet(nn.Module):
    """The model of the strokes: a small 1D CNN over a drawing's trajectory, as
    `utils.trajectory` gives it ((N, 5, points): x, y, step, pen lift along the ink), 148k
    parameters. Its output: logits.

    It reads what the image cannot show: where each stroke starts and which way it goes. Beside
    the image CNN it corrects digits whose image is ambiguous (an 8 written as two loops and a
    4 closed at the top look like their neighbours; their strokes do not): docs/training.md."""

    def __init__(self, width: int = 64, dropout: float = 0.3) -> None:
        super().__init__()

        def block(cin: int, cout: int, kernel_size: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv1d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(utils.TRAJECTORY_FEATURES, width, 5),
            block(width, width, 5),
            nn.MaxPool1d(2),
            block(width, 2 * width, 3),
            block(2 * width, 2 * width, 3),
            nn.MaxPool1d(2),
            block(2 * width, 2 * width, 3),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1))


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

    With `trajectory`, it holds the model of the strokes (`TrajectoryNet`) too. Given a
    drawing's trajectory beside its image, the answer is the normalised product of the two
    models' probabilities (each calibrated on its own; together they are as calibrated:
    docs/training.md); given the image alone (a drawing whose strokes are unknown), the CNN's
    answer.

    Weights: a state_dict with keys ``members.<i>.<layer>`` and ``member_count``, the number of
    members it holds (`load_weights` checks each is there), and with the model of the strokes
    its keys ``trajectory.<layer>`` and ``trajectory_points``, the points it reads. A file of the
    single network from before the ensemble (keys ``features.*``, ``classifier.*``) loads as one
    member. Trains in a few minutes per member on two CPU cores; predicts one digit in under a
    millisecond per member.
    """

    def __init__(self, members: int = 1, dropout: float = 0.3, trajectory: bool = False) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, not {members}")
        self.members = nn.ModuleList(ConvNet(dropout) for _ in range(members))
        # In the weights file: how many members it must hold (a member lost is an error).
        self.register_buffer(COUNT_KEY, torch.tensor(members))
        self.trajectory: TrajectoryNet | None = None
        if trajectory:
            self.add_trajectory(dropout)

    def add_trajectory(self, dropout: float = 0.3) -> None:
        """Give the classifier the model of the strokes, newly initialised. Its random start
        leaves the random numbers that follow (the CNN's training) as they would be without it."""
        with torch.random.fork_rng(devices=[]):
            self.trajectory = TrajectoryNet(dropout=dropout)
        self.register_buffer(TRAJECTORY_KEY, torch.tensor(utils.TRAJECTORY_POINTS))

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits, stacked: (members, N, 10). Training sums their losses."""
        return torch.stack([member(x) for member in self.members])

    def forward(self, x: torch.Tensor, trajectory: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities up to a constant (softmax reads them) of images `x` (N, 1, 28, 28);
        with their trajectories `trajectory` (N, 5, points) and the model of the strokes, of
        both."""
        out = self.members[0](x) if len(self.members) == 1 else combine(self.member_logits(x))
        if trajectory is None or self.trajectory is None:
            return out
        return torch.log_softmax(out, dim=1) + torch.log_softmax(self.trajectory(trajectory), 1)

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


class Compiled(nn.Module):
    """A DigitCNN made faster for the app's one drawing at a time, same answers (to ~1e-5 in the
    logits): its usual call (the image and its trajectory; the image alone for a model without
    the model of the strokes) traced into TorchScript, frozen (BatchNorm folded into the
    convolutions, weights as constants) and optimised for inference. At one drawing on one
    thread that is ~1.4 ms less per prediction: every op of the ~40 in the pair costs Python
    and dispatch time, more than its arithmetic (docs/benchmarks.md). The other call (a drawing
    whose strokes cannot be read) runs the model as it is. Compiling takes ~1 s, once per
    model loaded. For predictions only: train the DigitCNN it wraps (`net`)."""

    def __init__(self, net: DigitCNN) -> None:
        super().__init__()
        self.net = net.eval()
        example = [torch.zeros(1, 1, utils.FRAME_SIZE, utils.FRAME_SIZE)]
        if net.trajectory is not None:
            example.append(torch.zeros(1, utils.TRAJECTORY_FEATURES, utils.TRAJECTORY_POINTS))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on the members' count
            traced = torch.jit.freeze(torch.jit.trace(net, tuple(example)))
            self.usual = torch.jit.optimize_for_inference(traced)
        self.reads_strokes = net.trajectory is not None

    @property
    def trajectory(self) -> TrajectoryNet | None:
        return self.net.trajectory

    def forward(self, x: torch.Tensor, trajectory: torch.Tensor | None = None) -> torch.Tensor:
        if (trajectory is not None) == self.reads_strokes:
            return self.usual(x, trajectory) if self.reads_strokes else self.usual(x)
        return self.net(x, trajectory)


@dataclass(frozen=True)
class Prediction:
    digit: int
    confidence: float
    probabilities: tuple[float, ...]


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, or does not fit the network."""


def model_path() -> Path:
    """Where the app finds its weights: `MODEL_PATH` if set, else models/model.pth."""
    return settings.model_path()


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
    members = _check_members(state_dict, what, remedy)
    model = DigitCNN(members, trajectory=_check_trajectory(state_dict, what, remedy))
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
        if key not in (COUNT_KEY, TRAJECTORY_KEY)
        and not key.startswith(TRAJECTORY_PREFIX)  # _check_trajectory's
        and not ((m := MEMBER_KEY.match(key)) and int(m[1]) < members and m[2] in expected)
    ]
    if unexpected:
        raise ModelLoadError(
            f"{what} does not match this network's architecture ({members} members): unexpected "
            f"keys {_first(unexpected)}.{remedy}"
        )
    for index in range(members):
        _check_whole(
            state_dict, f"members.{index}.", expected, what, remedy,
            f"it holds an ensemble of {members} members, and member {index} is missing",
            f"member {index} of {members}",
        )  # fmt: skip
    return members


def _check_whole(
    state_dict: dict, prefix: str, expected, what: str, remedy: str, gone: str, part: str
) -> None:
    """ModelLoadError naming *what* unless every key of *expected* is in the state_dict under
    *prefix*: *gone* says what is missing when none is, *part* what lacks the ones missing."""
    missing = [key for key in expected if prefix + key not in state_dict]
    if len(missing) == len(expected):
        raise ModelLoadError(f"{what} is incomplete: {gone}.{remedy}")
    if missing:
        raise ModelLoadError(f"{what} is incomplete: {part} lacks {_first(missing)}.{remedy}")


def _first(keys: list[str]) -> str:
    """The first three of *keys*, for an error message."""
    return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")


def _check_trajectory(state_dict: dict, what: str, remedy: str) -> bool:
    """Whether a state_dict holds the model of the strokes (its ``trajectory_points`` says so),
    after checking that it holds it whole; ModelLoadError naming *what* if not. (`_check_members`
    has checked every value is a finite tensor.)"""
    keys = [key for key in state_dict if key.startswith(TRAJECTORY_PREFIX)]
    points = state_dict.get(TRAJECTORY_KEY)
    if points is None:
        if keys:
            raise ModelLoadError(
                f"{what} does not match this network's architecture: it holds the weights of a "
                f"model of the strokes but no {TRAJECTORY_KEY} (an integer).{remedy}"
            )
        return False
    if points.numel() != 1 or points.is_floating_point():
        raise ModelLoadError(f"{what} is corrupt: {TRAJECTORY_KEY} is not an integer.{remedy}")
    if int(points) != utils.TRAJECTORY_POINTS:
        raise ModelLoadError(
            f"{what} does not match this network's architecture: its model of the strokes reads "
            f"{int(points)} points, this app gives it {utils.TRAJECTORY_POINTS}.{remedy}"
        )
    with torch.random.fork_rng(devices=[]):
        expected = TrajectoryNet().state_dict().keys()
    _check_whole(
        state_dict, TRAJECTORY_PREFIX, expected, what, remedy,
        "it says it holds the model of the strokes (trajectory_points), and its weights are "
        "missing",
        "its model of the strokes",
    )  # fmt: skip
    unexpected = [key for key in keys if key.removeprefix(TRAJECTORY_PREFIX) not in expected]
    if unexpected:
        raise ModelLoadError(
            f"{what} does not match this network's architecture: unexpected keys "
            f"{_first(unexpected)}.{remedy}"
        )
    return True


def predict(
    model: nn.Module, batch: torch.Tensor, trajectory: torch.Tensor | None = None
) -> Prediction:
    """Predict the one digit in a (1, 1, 28, 28) batch, as `utils.preprocess` returns it, with
    its trajectory as `utils.trajectory` returns it, if known (None: the image alone)."""
    if batch.shape[0] != 1:
        raise ValueError(f"predict takes one image; use predict_batch for {batch.shape[0]}.")
    return predict_batch(model, batch, trajectory)[0]


def predict_batch(
    model: nn.Module, batch: torch.Tensor, trajectories: torch.Tensor | None = None
) -> list[Prediction]:
    """Predict every image of an (N, 1, 28, 28) batch; with their trajectories (N, 5, points),
    from both (a model without the model of the strokes reads the images alone)."""
    if batch.ndim != 4 or tuple(batch.shape[1:]) != (1, 28, 28):
        raise ValueError(f"Expected a batch of shape (N, 1, 28, 28), got {tuple(batch.shape)}.")
    expected = (len(batch), utils.TRAJECTORY_FEATURES)
    if trajectories is not None and (
        trajectories.ndim != 3 or tuple(trajectories.shape[:2]) != expected
    ):
        raise ValueError(
            f"Expected trajectories of shape ({expected[0]}, {expected[1]}, points) for "
            f"{len(batch)} images, got {tuple(trajectories.shape)}."
        )
    device = next(model.parameters()).device
    if trajectories is not None and getattr(model, "trajectory", None) is not None:
        trajectories = trajectories.to(device)
    else:
        trajectories = None  # forward's second argument only where a model reads it
    with torch.inference_mode():
        inputs = (batch.to(device),) if trajectories is None else (batch.to(device), trajectories)
        probabilities = torch.softmax(model(*inputs), dim=1).cpu()
    confidences, digits = probabilities.max(dim=1)
    return [
        Prediction(digit=int(digit), confidence=float(confidence), probabilities=tuple(row))
        for digit, confidence, row in zip(
            digits.tolist(), confidences.tolist(), probabilities.tolist(), strict=True
        )
    ]
