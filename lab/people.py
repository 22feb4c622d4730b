"""Simulated people: pen writers whose digits are stored as the app stores a person's answers,
for the tests and `python -m lab.evaluate --simulate-people`.

Each digit's pen strokes are put on the app's 280x280 canvas as they would be drawn there
(`pendigits.on_canvas`, the app's 18 px brush), drawn (`utils.draw_strokes`), read by the model
through `utils.preprocess` and `utils.trajectory` (its strokes), and stored through the app's
own call, `db.log_prediction(..., drawing=...)`: the `predictions` row with the model's
prediction and its `drawings` row in one transaction (the strokes in canvas pixels, y down, the
canvas size, the brush, the 28x28 image the model read).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import db
import drawings
import model as model_lib
import pendigits
import utils
from lab.postgres import PostgresProcess, initdb


@dataclass(frozen=True)
class Answer:
    prediction_id: int
    label: int
    predicted: int
    image: np.ndarray  # 28x28 uint8, what the model read


def create_schema(conninfo: str) -> None:
    """The app's tables in an empty database, as its owner."""
    db.migrate(conninfo, app_role=None)


def placed_on_canvas(digit: pendigits.PenDigit, seed: int) -> tuple[list[np.ndarray], float]:
    """The digit as a person would draw it on the canvas: strokes in canvas pixels, the brush."""
    return pendigits.on_canvas(digit.strokes, np.random.default_rng(seed), vary=False)


def store_answer(
    strokes: Sequence[np.ndarray],
    brush: float,
    label: int,
    net: torch.nn.Module,
    model_name: str,
    submission_id: uuid.UUID | None = None,
) -> Answer:
    """One drawing answered as in the app: the model's prediction on the drawn canvas and its
    strokes, the person's true label, stored with the drawing in one transaction by the app's
    own call (`db.log_prediction(..., drawing=...)`), to the database `db` is configured to."""
    model_input = utils.preprocess(utils.draw_strokes(strokes, brush))
    prediction = model_lib.predict(net, model_input, utils.trajectory(strokes))
    image = utils.to_pixels(model_input)
    # Canvas pixels (origin top left, y down), rounded as drawings.from_canvas rounds the app's.
    points = [
        [[round(float(x), drawings.DECIMALS), round(float(y), drawings.DECIMALS)] for x, y in line]
        for line in strokes
    ]
    drawing = db.Drawing(points, utils.CANVAS_SIZE, float(brush), image.tobytes())
    row_id = db.log_prediction(
        prediction.digit,
        label,
        prediction.confidence,
        submission_id or uuid.uuid4(),
        model_name,
        drawing=drawing,
    )
    return Answer(row_id, label, prediction.digit, image)


def answer_all(
    conninfo: str,
    digits: Sequence[pendigits.PenDigit],
    net: torch.nn.Module,
    model_name: str,
    seed: int = 0,
) -> list[Answer]:
    """Each digit drawn on the canvas and answered with its true label, under a submission id
    of its own that is a function of the digit, `seed` and its place (`submission_id`): the same
    answers are held out (1 in 5 submissions, chosen by submission id: `sources.is_held_out`) in
    every run of a measurement."""
    db.configure(conninfo)
    try:
        return [
            store_answer(
                *placed_on_canvas(digit, seed * 100_003 + i),
                digit.label,
                net,
                model_name,
                submission_id(digit, seed, i),
            )
            for i, digit in enumerate(digits)
        ]
    finally:
        db.configure(None)


def submission_id(digit: pendigits.PenDigit, seed: int, index: int) -> uuid.UUID:
    """A version-4 UUID, as the app's, drawn from the digit's strokes, `seed` and `index`."""
    content = hashlib.sha256(f"{seed}/{index}/{digit.writer}/{digit.label}".encode())
    for stroke in digit.strokes:
        content.update(np.ascontiguousarray(stroke).tobytes())
    return uuid.UUID(bytes=content.digest()[:16], version=4)


@contextlib.contextmanager
def throwaway_database() -> Iterator[PostgresProcess]:
    """A PostgreSQL server of its own with the app's tables, destroyed afterwards."""
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="people-", dir=shm if shm.is_dir() else None))
    base.chmod(0o711)  # as root, the server runs as another user, who must traverse it
    try:
        initdb(base / "pgdata")
        server = PostgresProcess(base / "server", template=base / "pgdata")
        server.start()
        try:
            create_schema(server.url)
            yield server
        finally:
            server.destroy()
    finally:
        shutil.rmtree(base, ignore_errors=True)
