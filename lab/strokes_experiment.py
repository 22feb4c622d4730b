"""Experiment: does the model of the strokes (`model.TrajectoryNet`), beside the image CNN, read
unseen writers' digits better than the CNN alone? The measurement behind shipping it
(docs/experiments.md, "How the model of the strokes was chosen").

Not product code; it uses the product's pieces: the trajectory as the app reads a drawing
(`utils.trajectory_features`: each stroke through the canvas's curves, centred and scaled,
64 points along the ink with x, y, step and pen lift), `model.TrajectoryNet`, and train.py's
training of it (`training.loops.train_trajectory_epoch`: each epoch every digit written anew by
`pendigits.vary_strokes` and placed anew by `pendigits.on_canvas`).

Protocol: trained on the pen writers that are neither held out (`pendigits.HELD_OUT_WRITERS`)
nor in `--val-writers` (own validation: shows each combination rule); measured once on the
held-out writers, alone and combined with the shipped CNN's probabilities (the CNN's input
rendered exactly as `lab.evaluate.pen_writers_report` renders it). `--rule product` is what
model.py ships (fixed before any held-out number, see docs/experiments.md). Caveat: the shipped
CNN was trained on the validation writers, so its probabilities there are those of training
data.

    python -m lab.strokes_experiment --rule product            # seed 0, 40 epochs
    python -m lab.strokes_experiment --rule product --seed 1
    python -m lab.strokes_experiment --cv-folds 4

`--cv-folds K` measures the augmentation without the held-out writers: the 24 training writers
(validation writers included) cut into K folds (sorted writer numbers, every K-th to a fold);
the model of the strokes trained on the other folds and measured ALONE on each fold in turn; the
folds' probabilities pooled (accuracy, log loss, ECE, per digit). No CNN, no held-out digit.

Until commit 93154ce this script had its own copy of the features, the network and a wider
geometric augmentation (rotation +-12 degrees, slant +-0.35, x and y stretched apart);
docs/experiments.md gives the figures of both.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

import model as model_lib
import pendigits
import utils
from training import sources
from training.config import TrainConfig
from training.loops import (
    TRAJECTORY_BATCH,
    TRAJECTORY_LR,
    Progress,
    StopFlag,
    train_trajectory_epoch,
)
from training.metrics import accuracy_report

VAL_WRITERS = (5, 11, 17, 23)


# --- the model of the strokes, trained as train.py trains it --------------------------------------


def feature_batch(digits) -> torch.Tensor:
    """Each digit's trajectory as the app reads it (its strokes flipped to the canvas's y
    down)."""
    return sources.trajectories([d.strokes for d in digits], y_up=True)


def train_model(digits, args, log=print) -> tuple[model_lib.TrajectoryNet, float]:
    """A model of the strokes trained on `digits` as train.py trains it (`train_trajectory_epoch`:
    `trajectory_inputs`' augmentation, its batch, learning rate and schedule), `args.epochs`
    epochs from seed `args.seed`."""
    torch.manual_seed(args.seed)
    net = model_lib.TrajectoryNet()
    labels = torch.tensor([d.label for d in digits])
    optimizer = torch.optim.AdamW(net.parameters(), lr=TRAJECTORY_LR, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=TRAJECTORY_LR,
        epochs=args.epochs,
        steps_per_epoch=math.ceil(len(digits) / TRAJECTORY_BATCH),
    )
    # The epochs of the model of the strokes count after the image CNN's (here 1, not trained).
    run = TrainConfig(epochs=1, trajectory_epochs=args.epochs, seed=args.seed, log_every=1e9)
    never = StopFlag()  # not installed: never stops
    started = time.process_time()
    for epoch in range(args.epochs):
        progress = Progress(run.epochs + epoch, 0)
        train_trajectory_epoch(
            net, digits, labels, optimizer, schedule, "cpu", run, progress, never
        )
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            log(f"  epoch {epoch + 1}: {time.process_time() - started:.0f} s CPU")
    return net.eval(), time.process_time() - started


def probabilities(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(net(x), dim=1).numpy().astype(np.float64)


def cnn_probabilities(cnn: nn.Module, digits) -> np.ndarray:
    """The shipped CNN's probabilities, its input drawn as `pen_writers_report` draws it."""
    pixels, _ = pendigits.render_for_training(digits, 1, seed=1, vary=False)
    found = model_lib.predict_batch(cnn, utils.normalize(pixels)[:, None])
    return np.array([p.probabilities for p in found], dtype=np.float64)


# --- combining and measuring ----------------------------------------------------------------


def rules() -> dict:
    out = {"cnn alone": lambda c, t: c, "strokes alone": lambda c, t: t}
    for w in (0.3, 0.5, 0.7):
        out[f"mean w={w}"] = lambda c, t, w=w: (1 - w) * c + w * t
    for w in (0.3, 0.5, 0.7):
        out[f"geo w={w}"] = lambda c, t, w=w: _normalise(c ** (1 - w) * t**w)
    out["product"] = lambda c, t: _normalise(c * t)
    return out


def _normalise(p: np.ndarray) -> np.ndarray:
    return p / p.sum(axis=1, keepdims=True)


def measure(p: np.ndarray, labels: np.ndarray) -> dict:
    predicted = p.argmax(axis=1)
    confidence = p.max(axis=1)
    report = accuracy_report(predicted.tolist(), labels.tolist(), confidence.tolist())
    nll = float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {**report, "errors": int((predicted != labels).sum()), "nll": nll}


def per_digit_ms(net: nn.Module, digits, repeats: int = 300) -> tuple[float, float]:
    """p50 ms per digit, one at a time: (features + model, model alone)."""
    whole, alone = [], []
    with torch.inference_mode():
        for i in range(repeats):
            d = digits[i % len(digits)]
            t0 = time.perf_counter()
            x = utils.trajectory([stroke * (1, -1) for stroke in d.strokes])
            t1 = time.perf_counter()
            torch.softmax(net(x), dim=1)
            t2 = time.perf_counter()
            whole.append(t2 - t0)
            alone.append(t2 - t1)
    return 1000 * float(np.median(whole)), 1000 * float(np.median(alone))


def cross_validate(rest, args) -> None:
    """Leave-writers-out cross-validation of the model of the strokes alone on `rest` (never the
    held-out writers): each fold's writers measured by a model trained on the other folds."""
    writers = sorted({d.writer for d in rest})
    folds = [writers[i :: args.cv_folds] for i in range(args.cv_folds)]
    probs, labels, cpu = [], [], 0.0
    for i, fold in enumerate(folds):
        fit, out = pendigits.split_writers(rest, fold)
        print(f"fold {i + 1}: train {len(fit)} digits, measure {len(out)} (writers {fold})")
        net, seconds = train_model(fit, args)
        cpu += seconds
        p, y = probabilities(net, feature_batch(out)), np.array([d.label for d in out])
        m = measure(p, y)
        print(f"  fold {i + 1}: {m['accuracy']:.2%} ({m['errors']} wrong), log loss {m['nll']:.4f}")
        probs.append(p)
        labels.append(y)
    m = measure(np.concatenate(probs), np.concatenate(labels))
    worst = min(m["by_digit"].items(), key=lambda kv: kv[1])
    print(
        f"\nCV pooled ({args.cv_folds} folds, {m['count']} digits, "
        f"seed {args.seed}): "
        f"{m['accuracy']:.2%} ({m['errors']} wrong), log loss {m['nll']:.4f}, ECE {m['ece']:.2%}, "
        f"min digit {worst[0]}: {worst[1]:.1%}; {cpu:.0f} s CPU"
    )
    print("  by digit: " + ", ".join(f"{d} {a:.1%}" for d, a in m["by_digit"].items()))
    print(f"  confusions: {m['confusions']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pen-file", default=str(pendigits.default_path()))  # env PENDIGITS_DIR
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--val-writers", default=",".join(map(str, VAL_WRITERS)))
    parser.add_argument("--save", help="write the model of the strokes' state_dict here")
    parser.add_argument(
        "--rule",
        choices=[r for r in rules() if r not in ("cnn alone", "strokes alone")],
        help="report this combination in detail instead of the validation writers' choice",
    )
    parser.add_argument(
        "--cv-folds",
        type=int,
        default=0,
        help="cross-validate the model of the strokes alone on the training writers, K folds",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    digits = pendigits.load(args.pen_file)
    rest, held_out = pendigits.split_writers(digits, pendigits.HELD_OUT_WRITERS)
    if args.cv_folds:
        return cross_validate(rest, args)
    val_writers = [int(w) for w in args.val_writers.split(",") if w]
    fit, val = pendigits.split_writers(rest, val_writers)
    print(
        f"train {len(fit)} digits ({len({d.writer for d in fit})} writers), validation "
        f"{len(val)} (writers {val_writers}), held out {len(held_out)} "
        f"(writers {list(pendigits.HELD_OUT_WRITERS)})"
    )

    net, cpu_seconds = train_model(fit, args)
    print(f"trained in {cpu_seconds:.0f} s CPU (1 thread)")
    if args.save:
        torch.save(net.state_dict(), args.save)

    cnn = model_lib.load_model(model_lib.DEFAULT_MODEL_PATH)
    sets = {}
    for name, part in (("validation", val), ("held out", held_out)):
        labels = np.array([d.label for d in part])
        sets[name] = (
            cnn_probabilities(cnn, part),
            probabilities(net, feature_batch(part)),
            labels,
        )

    results = {
        name: {r: measure(f(c, t), y) for r, f in rules().items()}
        for name, (c, t, y) in sets.items()
    }
    # The rule: the combination with the lowest validation log loss (never the held-out set).
    combos = [r for r in rules() if r not in ("cnn alone", "strokes alone")]
    chosen = args.rule or min(
        combos,
        key=lambda r: (results["validation"][r]["nll"], -results["validation"][r]["accuracy"]),
    )
    how = "fixed by --rule" if args.rule else "chosen on validation writers (lowest log loss)"
    print(f"\n{how}: {chosen}")
    print(
        f"{'rule':16} {'val acc':>8} {'val err':>7} {'val nll':>8} | {'held acc':>8} "
        f"{'err':>4} {'ECE':>6} {'nll':>6}  min digit"
    )
    for r in rules():
        v, h = results["validation"][r], results["held out"][r]
        worst = min(h["by_digit"].items(), key=lambda kv: kv[1])
        print(
            f"{r + (' *' if r == chosen else ''):16} {v['accuracy']:8.2%} {v['errors']:7d} "
            f"{v['nll']:8.4f} | {h['accuracy']:8.2%} {h['errors']:4d} {h['ece']:6.2%} "
            f"{h['nll']:6.3f}  {worst[0]}: {worst[1]:.1%}"
        )

    c, t, y = sets["held out"]
    for r in ("strokes alone", chosen):
        h = results["held out"][r]
        print(
            f"\n{r} on held-out, by digit: "
            + ", ".join(f"{d} {a:.1%}" for d, a in h["by_digit"].items())
        )
        print(f"  confusions: {h['confusions']}")
    combined = rules()[chosen](c, t)
    cnn_wrong = set(np.flatnonzero(c.argmax(1) != y))
    comb_wrong = set(np.flatnonzero(combined.argmax(1) != y))

    def describe(i):
        d = held_out[i]
        return (
            f"#{i} writer {d.writer} {d.label} ({len(d.strokes)} stroke"
            f"{'s' if len(d.strokes) > 1 else ''}): cnn {c[i].argmax()} {c[i].max():.2f}, "
            f"strokes {t[i].argmax()} {t[i].max():.2f}, combined {combined[i].argmax()} "
            f"{combined[i].max():.2f}"
        )

    print(
        f"\nCNN's {len(cnn_wrong)} held-out errors, fixed by '{chosen}': "
        f"{len(cnn_wrong - comb_wrong)}"
    )
    for i in sorted(cnn_wrong):
        print(("  fixed   " if i not in comb_wrong else "  kept    ") + describe(i))
    print(f"new errors of '{chosen}': {len(comb_wrong - cnn_wrong)}")
    for i in sorted(comb_wrong - cnn_wrong):
        print("  new     " + describe(i))

    whole, alone = per_digit_ms(net, held_out)
    params = sum(p.numel() for p in net.parameters())
    print(
        f"\nthe model of the strokes: {params} parameters; one digit, 1 thread, p50: "
        f"{whole:.2f} ms (features + model), {alone:.2f} ms (model alone)"
    )


if __name__ == "__main__":
    main()
