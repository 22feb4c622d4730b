"""What the registry's tests share (test_registry_*.py, test_versions.py), a plugin of
conftest.py's: a PostgreSQL server with the app's role, the live model's file, and the vandal
drill's digits and candidates.

The drill's candidates are built cheaply and honestly: the shipped model fine-tuned for a few
steps on what a vandal's answers would teach it (real MNIST and pen digits from tests/data), then
judged by promote() on real evaluation sets.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import db
import mnist
import pendigits
import utils
from lab.postgres import PostgresProcess
from registry import promotion, store
from registry.promotion import EvalSet

SHIPPED = ROOT / "models" / "model.pth"
MNIST_SUBSET = ROOT / "tests" / "data" / "mnist-subset"
PEN_SUBSET = ROOT / "tests" / "data" / "pendigits-subset" / pendigits.FILE_NAME
VANDAL_ANSWERS = 300
APP_PASSWORD = "app-secret"


def held_out(submission_id: uuid.UUID) -> bool:
    """The held-out feedback split: 1 in 5 submissions held out, chosen by submission id (as
    sources.is_held_out chooses them)."""
    return int(hashlib.sha256(str(submission_id).encode()).hexdigest(), 16) % 5 == 0


def inputs(pixels: torch.Tensor) -> torch.Tensor:
    return utils.normalize(pixels).unsqueeze(1)


@dataclass
class Drill:
    """Real digits for the drill: people's honest answers, the evaluation sets' images."""

    mnist_train: tuple[torch.Tensor, torch.Tensor]
    mnist_test: tuple[torch.Tensor, torch.Tensor]
    pen_held_out: tuple[torch.Tensor, torch.Tensor]  # writers 3 and 8: never trained on
    people: tuple[torch.Tensor, torch.Tensor]  # writers 1 and 2, as if drawn in the app


@pytest.fixture(scope="session")
def drill() -> Drill:
    digits = pendigits.load(PEN_SUBSET)
    people, pen_held = pendigits.split_writers(digits, pendigits.HELD_OUT_WRITERS)
    return Drill(
        mnist.load_split(MNIST_SUBSET, "train"),
        mnist.load_split(MNIST_SUBSET, "test"),
        pendigits.render_for_training(pen_held, 1, seed=0, vary=False),
        pendigits.render_for_training(people, 2, seed=0, vary=True),
    )


def feedback(drill: Drill, vandal: str, seed: int = 0):
    """Every answer stored: the people's honest ones and 300 of a vandal who labels every 7 as 1
    ("sevens") or gives random labels ("random"); split into (trained on, held out) by
    submission id as train.py splits them."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = drill.mnist_train
    if vandal == "sevens":
        sevens = images[labels == 7]
        vandal_images = sevens[torch.randint(len(sevens), (VANDAL_ANSWERS,), generator=generator)]
        vandal_labels = torch.ones(VANDAL_ANSWERS, dtype=torch.int64)
    else:
        chosen = torch.randint(len(images), (VANDAL_ANSWERS,), generator=generator)
        vandal_images = images[chosen]
        vandal_labels = torch.randint(10, (VANDAL_ANSWERS,), generator=generator)
    all_images = torch.cat([drill.people[0], vandal_images])
    all_labels = torch.cat([drill.people[1], vandal_labels])
    ids = [uuid.UUID(int=seed * 10_000 + i) for i in range(len(all_labels))]
    held = torch.tensor([held_out(i) for i in ids])
    return (all_images[~held], all_labels[~held]), (all_images[held], all_labels[held])


def fine_tune(weights: bytes, feedback_train, mnist_train, steps: int = 40, seed: int = 0):
    """The live model trained a few steps on half feedback, half MNIST (as a retrain with a
    feedback share of one half would see them); its weights file's bytes."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 4x less CPU than 2 threads for these small batches
    net = store.load_weights(weights).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        batch_images, batch_labels = [], []
        for images, labels in (feedback_train, mnist_train):
            chosen = torch.randint(len(labels), (32,))
            batch_images.append(images[chosen])
            batch_labels.append(labels[chosen])
        loss = F.cross_entropy(net(inputs(torch.cat(batch_images))), torch.cat(batch_labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    buffer = io.BytesIO()
    torch.save(net.eval().state_dict(), buffer)
    return buffer.getvalue()


def eval_sets(drill: Drill, feedback_held_out) -> dict[str, EvalSet]:
    return {
        promotion.PRIMARY: EvalSet(inputs(feedback_held_out[0]), feedback_held_out[1], True),
        "MNIST test": EvalSet(inputs(drill.mnist_test[0]), drill.mnist_test[1]),
        "held-out pen writers": EvalSet(inputs(drill.pen_held_out[0]), drill.pen_held_out[1]),
    }


@pytest.fixture(scope="session")
def vandal_candidates(drill: Drill) -> dict[str, tuple[bytes, dict[str, EvalSet]]]:
    """For each vandal: the candidate trained on the feedback, and the evaluation sets."""
    shipped = SHIPPED.read_bytes()
    result = {}
    for vandal in ("sevens", "random"):
        trained, held = feedback(drill, vandal)
        result[vandal] = (fine_tune(shipped, trained, drill.mnist_train), eval_sets(drill, held))
    return result


@pytest.fixture
def server(fresh_pg_server: PostgresProcess) -> PostgresProcess:
    db.migrate(fresh_pg_server.url, db.APP_ROLE, APP_PASSWORD)
    return fresh_pg_server


@pytest.fixture
def live_file(tmp_path: Path) -> Path:
    """A copy of the shipped model and its model.json: what --out points at."""
    out = tmp_path / "models" / "model.pth"
    out.parent.mkdir()
    shutil.copy(SHIPPED, out)
    shutil.copy(SHIPPED.with_suffix(".json"), out.with_suffix(".json"))
    return out


def write(path: Path, weights: bytes) -> Path:
    path.write_bytes(weights)
    return path


def promotions(server: PostgresProcess) -> list[tuple[str, str]]:
    with server.connect() as conn:
        return conn.execute("SELECT action, sha256 FROM model_promotions ORDER BY id").fetchall()


def sha(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()


def honest_sets(drill: Drill) -> dict[str, EvalSet]:
    """The evaluation sets with the people's honest answers as the held-out feedback."""
    return eval_sets(drill, drill.people)
