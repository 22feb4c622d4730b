"""Ensembles: join model files into one, and measure each member beside the ensemble.

    python -m lab.ensemble --report models/model.pth          # its members and the ensemble
    python -m lab.ensemble --join /tmp/k3.pth a.pth b.pth     # one file holding every member

`--report` reads the held-out pen writers (`pen_held_out.writers` of the model's model.json, as
`lab.evaluate` does) drawn as train.py measured them, and prints for each member and for the
ensemble (the mean of the members' probabilities, what `model.predict` answers) the accuracy,
the errors and the expected calibration error (`training.metrics.expected_calibration_error`:
15 equal bins of confidence; the mean gap between confidence and accuracy, weighted by the bin's
share of the digits).

`--join` writes one weights file with the members of every file given, in order (members trained
in separate runs, on other machines, or a single network from before the ensemble): each member
is its own network with its own BatchNorm, so the joined file answers exactly as the mean of
their probabilities. It loads with `model.load_model` like any other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import model as model_lib
import pendigits
import utils
from training.metrics import expected_calibration_error


def join(paths: list[Path]) -> dict:
    """One state_dict holding the members of every file in *paths*, in order."""
    joined: dict = {}
    for path in paths:
        net = model_lib.load_model(path)
        for member in net.members:
            index = int(joined.get(model_lib.COUNT_KEY, 0))
            for key, value in member.state_dict().items():
                joined[f"members.{index}.{key}"] = value
            joined[model_lib.COUNT_KEY] = torch.tensor(index + 1)
    return joined


def report(path: Path, pen_file: Path) -> list[str]:
    net = model_lib.load_model(path)
    info_path = path.with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    writers = info.get("pen_held_out", {}).get("writers", pendigits.HELD_OUT_WRITERS)
    _, held_out = pendigits.split_writers(pendigits.load(pen_file), writers)
    pixels, labels = pendigits.render_for_training(
        held_out, 1, seed=info.get("seed", 1), vary=False
    )
    inputs = utils.normalize(pixels)[:, None]
    with torch.inference_mode():
        members = torch.softmax(net.member_logits(inputs), dim=-1)
        ensemble = torch.softmax(net(inputs), dim=1)
    lines = [f"{path}: {len(net.members)} members; held-out writers {','.join(map(str, writers))}"]
    for name, probabilities in [
        *((f"member {i}", p) for i, p in enumerate(members)),
        ("ensemble", ensemble),
    ]:
        confidence, predicted = probabilities.max(1)
        wrong = int((predicted != labels).sum())
        ece = expected_calibration_error(confidence.tolist(), (predicted == labels).tolist())
        lines.append(
            f"  {name:>9}: {1 - wrong / len(labels):.2%} of {len(labels)} ({wrong} wrong), "
            f"ECE {ece:.2%}, mean confidence {float(confidence.mean()):.2%}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, help="a model file: its members and the ensemble")
    parser.add_argument("--join", type=Path, help="write the joined ensemble here")
    parser.add_argument("files", type=Path, nargs="*", help="with --join: the model files")
    parser.add_argument("--pen-file", type=Path, default=None, help="default: PENDIGITS_DIR's")
    args = parser.parse_args()
    if args.join:
        if len(args.files) < 2:
            parser.error("--join needs two model files or more")
        joined = join(args.files)
        torch.save(joined, args.join)
        model_lib.load_model(args.join)  # it loads, or this says why
        print(
            f"{args.join}: {int(joined[model_lib.COUNT_KEY])} members from {len(args.files)} files"
        )
    if args.report:
        print("\n".join(report(args.report, args.pen_file or pendigits.default_path())))


if __name__ == "__main__":
    main()
