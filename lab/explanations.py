"""The deletion test of the explanations ("Why?" on the Draw page): is the ink a map ranks first
the ink the served model needs? `python -m lab.evaluate --explanations`.

Each digit of the held-out pen writers is put on the app's canvas with its brush, as a person
draws it (`pendigits.on_canvas`, no variation), read as the app reads a drawing by the model it
serves (`model.Compiled`), and explained by each method below: a map of evidence for its answer
against the runner-up, per point of the ink. The ink, in the order drawn, is cut into `UNITS`
stretches of equal length; the `REMOVED` stretches the map ranks first (their mean evidence) are
removed, 10% of the ink, and the drawing is read again as the app reads it. Likewise `REMOVED`
stretches at random (`RANDOM_DRAWS` draws per digit). A faithful map makes the served model's
confidence in its answer fall clearly more than random removal does.

The methods:
- occlusion: `explain.explain`, what the app shows;
- integrated gradients: the attribution of the pair's log-odds (answer against runner-up) to
  its two inputs, the 28x28 image (from a blank one) and the trajectory (from zeros), in
  `IG_STEPS` steps; a point of the ink gets the image's attribution where it lands in the 28x28
  frame (`utils.place_digit`), scaled so that the points carry the image's whole attribution,
  plus its share of the attribution of the trajectory point at its place along the ink;
- gradient x input: the same in one step, at the input.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch

import explain
import model as model_lib
import pendigits
import utils

UNITS = 40  # the ink cut into stretches of 2.5% of its length
REMOVED = 4  # ... 10% of the ink removed
RANDOM_DRAWS = 3
IG_STEPS = 16
METHODS = ("occlusion", "integrated gradients", "gradient x input")


def deletion_report(
    served: model_lib.Compiled, digits: Sequence[pendigits.PenDigit], seed: int = 1
) -> dict[str, dict[str, float]]:
    """Per method: the served model's mean confidence in its answer before and after removing
    the 10% of the ink the map ranks first, and after removing 10% at random; how often that
    changed the answer; and the CPU milliseconds per explanation (p50)."""
    net = served.net
    evidence_of: dict[str, Callable] = {
        "occlusion": lambda placed, _, *args: explain.explain(served, placed, *args).both,
        "integrated gradients": lambda _, *args: gradients(net, *args, steps=IG_STEPS),
        "gradient x input": lambda _, *args: gradients(net, *args, steps=1),
    }
    before: list[float] = []
    found = {name: defaultdict(list) for name in METHODS}
    for index, digit in enumerate(digits):
        placed, brush = pendigits.on_canvas(
            digit.strokes, np.random.default_rng((seed, index)), vary=False
        )
        lines = explain.sample(placed)  # as explain.explain samples them: the same points
        (probabilities,) = read(served, [lines], brush)
        answer, runner_up = (int(d) for d in np.argsort(-probabilities)[:2])
        before.append(float(probabilities[answer]))
        units = explain.piece_of_each_point(lines, UNITS)
        draws = np.random.default_rng((seed, index, 1))
        at_random = [draws.choice(UNITS, REMOVED, replace=False) for _ in range(RANDOM_DRAWS)]
        for name in METHODS:
            started = time.process_time()
            evidence = evidence_of[name](placed, lines, answer, runner_up, brush)
            found[name]["ms"].append(1000 * (time.process_time() - started))
            score = np.concatenate(evidence)
            unit = np.concatenate(units)
            ranked = np.argsort(-np.array([score[unit == k].mean() for k in range(UNITS)]))
            removals = [ranked[:REMOVED], *at_random]
            after = read(
                served,
                [explain.without(lines, [np.isin(u, r) for u in units]) for r in removals],
                brush,
            )
            found[name]["top"].append(float(after[0][answer]))
            found[name]["random"].append(float(np.mean([a[answer] for a in after[1:]])))
            fall = [logit(before[-1]) - logit(a[answer]) for a in after]
            found[name]["fall_top"].append(fall[0])
            found[name]["fall_random"].append(float(np.mean(fall[1:])))
            found[name]["changed"].append(int(np.argmax(after[0]) != answer))
    confidence = float(np.mean(before))
    return {
        name: {
            "digits": len(before),
            "confidence": confidence,
            "after_top": float(np.mean(rows["top"])),
            "after_random": float(np.mean(rows["random"])),
            "log_odds_fall_top": float(np.median(rows["fall_top"])),
            "log_odds_fall_random": float(np.median(rows["fall_random"])),
            "answers_changed": float(np.mean(rows["changed"])),
            "ms_p50": float(np.median(rows["ms"])),
        }
        for name, rows in found.items()
    }


def logit(probability: float) -> float:
    """The log-odds of a probability, clipped away from 0 and 1 (float32's resolution)."""
    p = min(max(probability, 1e-7), 1 - 1e-7)
    return float(np.log(p / (1 - p)))


def read(
    served: model_lib.Compiled, drawings: list[list[np.ndarray]], brush: float
) -> list[np.ndarray]:
    """Each drawing's probabilities as the app reads it (all zero if it holds no digit)."""
    out = []
    for lines in drawings:
        try:
            image = utils.preprocess(utils.draw_strokes(lines, brush))
            trajectory = utils.trajectory(lines)
        except ValueError:
            out.append(np.zeros(10))
            continue
        out.append(np.array(model_lib.predict(served, image, trajectory).probabilities))
    return out


def gradients(
    net: model_lib.DigitCNN,
    lines: list[np.ndarray],
    answer: int,
    runner_up: int,
    brush: float,
    steps: int,
) -> list[np.ndarray]:
    """Integrated gradients (`steps` > 1) or gradient x input (1) of the pair's log-odds of
    `answer` against `runner_up`, per point of `lines` (see the module's docstring)."""
    drawn = utils.draw_strokes(lines, brush)
    pixels, placement = utils.place_digit(utils.ink_map(drawn))
    image = utils.normalize(pixels)[None, None]
    trajectory = utils.trajectory(lines)
    blank = utils.normalize(np.zeros_like(pixels))[None, None]
    alphas = torch.ones(1) if steps == 1 else (torch.arange(steps) + 0.5) / steps
    images = (blank + alphas[:, None, None, None] * (image - blank)).requires_grad_(True)
    trajectories = (alphas[:, None, None] * trajectory).requires_grad_(True)
    out = torch.log_softmax(net.eval()(images, trajectories), 1)
    (out[:, answer] - out[:, runner_up]).sum().backward()
    image_map = ((image - blank) * images.grad.mean(0, keepdim=True))[0, 0].numpy()
    along = (trajectory * trajectories.grad.mean(0, keepdim=True))[0].sum(0).numpy()
    points = np.concatenate(lines)
    at_point = _bilinear(image_map, placement.to_frame(points))
    at_point *= image_map.sum() / (at_point.sum() or 1.0)
    index = np.minimum(np.arange(len(points)) * len(along) // len(points), len(along) - 1)
    at_point += along[index] / np.bincount(index, minlength=len(along))[index]
    return np.split(at_point, np.cumsum([len(line) for line in lines])[:-1])


def _bilinear(values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """`values` (a 28x28 map, pixel centres at .5) at `points` (x, y), interpolated."""
    x = np.clip(points[:, 0] - 0.5, 0, values.shape[1] - 1)
    y = np.clip(points[:, 1] - 0.5, 0, values.shape[0] - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, values.shape[1] - 1), np.minimum(y0 + 1, values.shape[0] - 1)
    fx, fy = x - x0, y - y0
    return (
        values[y0, x0] * (1 - fx) * (1 - fy)
        + values[y0, x1] * fx * (1 - fy)
        + values[y1, x0] * (1 - fx) * fy
        + values[y1, x1] * fx * fy
    )


def print_report(report: dict[str, dict[str, float]]) -> None:
    first = next(iter(report.values()))
    print(
        f"\nDeletion test on {first['digits']} digits of the held-out pen writers: the served "
        f"model's confidence in its answer, {first['confidence']:.2%} before, after removing 10% "
        "of the ink"
    )
    print(
        "| method | confidence, the map's first 10% removed | at random | answer's log-odds fall,"
        " first 10% (median) | at random | answers changed | ms p50 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, row in report.items():
        print(
            f"| {name} | {row['after_top']:.2%} | {row['after_random']:.2%} | "
            f"{row['log_odds_fall_top']:.2f} | {row['log_odds_fall_random']:.2f} | "
            f"{row['answers_changed']:.1%} | {row['ms_p50']:.0f} |"
        )
