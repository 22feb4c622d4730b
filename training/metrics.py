"""How well a model reads digits, measured as the app reads them: accuracy overall, per digit and
with the worst confusions (`accuracy_report`), and the expected calibration error
(`expected_calibration_error`), defined here once for train.py and the lab.

During training, after each epoch: the 28x28 images as they are (`epoch_figures`,
`trajectory_figures`: fast). At the end: MNIST's test set and each held-out part read as the
app reads a drawing, through `utils.preprocess` and `model.predict_batch` (`final_figures`), for
model.json.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

import model as model_lib
import utils

if TYPE_CHECKING:
    from training import sources

log = logging.getLogger("train")

EVAL_BATCH = 500  # images per forward pass when measuring (a whole set at once: 100s of MB)


def expected_calibration_error(
    confidences: Sequence[float], right: Sequence[bool], bins: int = 15
) -> float:
    """Expected calibration error: the confidences cut into `bins` equal-width bins ((0, 1/15],
    (1/15, 2/15], ...), each bin's |accuracy - mean confidence| weighted by its share of the
    images (Naeini et al., 2015; Guo et al., 2017, with 15 bins)."""
    confidence = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(right, dtype=np.float64)
    if not len(confidence):
        return 0.0
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    gaps = [
        (which == b).sum() * abs(correct[which == b].mean() - confidence[which == b].mean())
        for b in np.unique(which)
    ]
    return float(sum(gaps) / len(confidence))


def accuracy_report(
    predicted: Sequence[int | None],
    labels: Sequence[int],
    confidences: Sequence[float] | None = None,
) -> dict:
    """Accuracy overall and per digit, and the most frequent confusions ("7 read as 2", count);
    an image seen as empty counts as wrong. With the `confidences` shown (0 for an image seen
    as empty), also the expected calibration error (`ece`)."""
    right = [p == t for p, t in zip(predicted, labels, strict=True)]
    totals, correct = Counter(labels), Counter(t for r, t in zip(right, labels, strict=True) if r)
    by_digit = {str(d): round(correct[d] / totals[d], 4) for d in sorted(totals)}
    confusions = Counter(
        f"{t} read as {'nothing' if p is None else p}"
        for p, t in zip(predicted, labels, strict=True)
        if p != t
    )
    calibration = (
        {"ece": round(expected_calibration_error(confidences, right), 5)}
        if confidences is not None
        else {}
    )
    return {
        "accuracy": sum(right) / max(1, len(right)),
        "count": len(right),
        "by_digit": by_digit,
        "confusions": dict(confusions.most_common(5)),
        **calibration,
    }


def predicted_digits(
    net: torch.nn.Module, images: Iterable[np.ndarray], batch_size: int = 500
) -> list[int | None]:
    """The digit the app would show for each raw image (None where `preprocess` sees no digit):
    each image through `utils.preprocess`, then `predict_batch` in batches."""
    return [p and p.digit for p in predictions(net, images, batch_size)]


def predictions(
    net: torch.nn.Module, images: Iterable[np.ndarray], batch_size: int = 500
) -> list[model_lib.Prediction | None]:
    """What the app would show for each raw image, digit and confidence (None where
    `preprocess` sees no digit): each image through `utils.preprocess`, then `predict_batch`."""
    return read_drawings(net, ((image, None) for image in images), batch_size)


def read_drawings(
    net: torch.nn.Module, drawings: Iterable[tuple[np.ndarray, object]], batch_size: int = 500
) -> list[model_lib.Prediction | None]:
    """`predictions` of (image, strokes) pairs, each read as the app reads a drawing: its image
    through `utils.preprocess`, its strokes (canvas pixels, y down; None: unknown) through
    `utils.trajectory`, then `predict_batch` (a batch with any strokes unknown: the images
    alone)."""
    found: list[model_lib.Prediction | None] = []
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    def flush() -> None:
        known = [trajectory for _, _, trajectory in pending]
        trajectories = torch.cat(known) if all(t is not None for t in known) else None
        images = torch.cat([image for _, image, _ in pending])
        for (position, _, _), prediction in zip(
            pending, model_lib.predict_batch(net, images, trajectories), strict=True
        ):
            found[position] = prediction
        pending.clear()

    for image, strokes in drawings:
        found.append(None)
        try:
            model_input = utils.preprocess(image)
        except utils.EmptyImageError:
            continue
        trajectory = utils.trajectory(strokes) if strokes is not None else None
        pending.append((len(found) - 1, model_input, trajectory))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return found


def pixels_accuracy(net, images: sources.Images, device) -> float:
    """Accuracy on 28x28 uint8 images as they are (MNIST's own framing: fast; read as the app
    reads them at the end)."""
    net.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), 1000):
            batch = utils.normalize(images.images[start : start + 1000]).unsqueeze(1).to(device)
            predicted = net(batch.contiguous(memory_format=torch.channels_last)).argmax(1)
            correct += int((predicted.cpu() == images.labels[start : start + 1000]).sum())
    net.train()
    return correct / max(1, len(images))


def epoch_figures(net, data: sources.Data, device, epoch: int) -> dict:
    """Accuracy on MNIST's test set and each held-out part after an epoch (fast: the 28x28
    images as they are; read as the app reads them at the end)."""
    figures = {"epoch": epoch + 1, "test_accuracy": pixels_accuracy(net, data.test, device)}
    for held in data.held_out:
        figures[f"{held.key}_accuracy"] = pixels_accuracy(net, held, device)
    return figures


def trajectory_figures(net, data: sources.Data, device, epoch: int) -> dict:
    """After an epoch of the model of the strokes, on each held-out part whose strokes are known:
    the accuracy of the model of the strokes alone and of the app's answer (both models)."""
    figures = {"epoch": epoch + 1}
    net.eval()
    for held in data.held_out:
        if held.trajectories is None:
            continue
        alone, both = [], []
        for start in range(0, len(held), EVAL_BATCH):
            trajectories = held.trajectories[start : start + EVAL_BATCH].to(device)
            images = utils.normalize(held.images[start : start + EVAL_BATCH])[:, None].to(device)
            with torch.inference_mode():
                alone.append(net.trajectory(trajectories).argmax(1).cpu())
                images = images.contiguous(memory_format=torch.channels_last)
                both.append(net(images, trajectories).argmax(1).cpu())
        for name, found in (("strokes_accuracy", alone), ("accuracy", both)):
            figures[f"{held.key}_{name}"] = float((torch.cat(found) == held.labels).float().mean())
    return figures


def final_figures(net, data: sources.Data) -> dict:
    """MNIST's test set through utils.preprocess (as the app reads it) and each held-out part, per
    digit and with its worst confusions, logged and returned for model.json."""
    found = predictions(net, (image.numpy() for image in data.test.images))
    test = accuracy_report(
        [p and p.digit for p in found],
        data.test.labels.tolist(),
        [p.confidence if p else 0.0 for p in found],
    )
    log.info(
        "MNIST test set: %.2f%% of %d, expected calibration error %.2f%%",
        100 * test["accuracy"],
        len(data.test),
        100 * test["ece"],
    )
    metrics = {"test_accuracy": test["accuracy"], "test_ece": test["ece"]}
    for held in data.held_out:
        # Held-out images went through utils.preprocess already, their strokes through
        # utils.trajectory: this is how the app reads them.
        images = utils.normalize(held.images)[:, None]
        report = held_out_report(net, images, held)
        if held.trajectories is not None and net.trajectory is not None:
            alone = held_out_report(net, images, held, strokes=False)
            report["image_alone"] = {k: alone[k] for k in ("accuracy", "ece", "by_digit")}
        log.info(
            "%s: %.2f%% of %d, expected calibration error %.2f%%; by digit %s; worst confusions %s",
            held.title,
            100 * report["accuracy"],
            len(held),
            100 * report["ece"],
            " ".join(f"{d}:{a:.1%}" for d, a in report["by_digit"].items()),
            ", ".join(f"{c} x{n}" for c, n in report["confusions"].items()) or "none",
        )
        metrics[held.key] = {**held.about, **report}
    return metrics


def held_out_report(net, images: torch.Tensor, held: sources.HeldOut, strokes: bool = True):
    """`accuracy_report` of the app's answers on a held-out part (from its images alone, if
    not `strokes` or its strokes are unknown)."""
    predicted = []
    for start in range(0, len(images), EVAL_BATCH):  # a whole set at once: hundreds of MB
        part = slice(start, start + EVAL_BATCH)
        trajectories = (
            held.trajectories[part] if strokes and held.trajectories is not None else None
        )
        predicted += model_lib.predict_batch(net, images[part], trajectories)
    return accuracy_report(
        [p.digit for p in predicted], held.labels.tolist(), [p.confidence for p in predicted]
    )
