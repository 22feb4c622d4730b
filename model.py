"""The digit classifier: the CNN, loading its weights, and predicting."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_PATH = PROJECT_DIR / "models" / "model.pth"
TRAIN_COMMAND = "python train.py --download"


class DigitCNN(nn.Module):
    """A small, fast CNN for 28x28 digits: three conv blocks (24, 48, 96 channels, 61k
    parameters), each halving the resolution; wider than it was (16, 32, 64) since it learns pen
    handwriting beside MNIST (README, Training).

    Trains in a few minutes on two CPU cores and predicts one digit in well under a millisecond.
    """

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
    model = DigitCNN()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{what} does not match this network's architecture: {exc}.{remedy}"
        ) from exc
    return model.to(device).eval()


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
