"""The person's answer about a prediction: reading the true label, naming each submission, and
which submissions are held out of training (`is_held_out`).

Each answer gets a ``submission_id`` the first time it is sent. A retry of the same answer (same
drawing, same label) reuses it, so ``db.log_prediction`` stores it once even if an earlier
attempt reached the database but its reply was lost.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

DIGITS = "0123456789"
MAX_LABEL_CHARS = 5  # room for a digit between spaces; the text input holds no more
HELD_OUT_BUCKETS = 5  # 1 in 5 submissions is held out, chosen by submission id (`is_held_out`)


class InvalidLabel(ValueError):
    """The typed true label is not a single digit from 0 to 9."""


def parse_true_label(text: str | None) -> int:
    """The digit in *text*: exactly one ASCII digit, surrounding whitespace allowed, in at most
    MAX_LABEL_CHARS characters."""
    if text is not None and len(text) > MAX_LABEL_CHARS:
        raise InvalidLabel("The true label must be one digit from 0 to 9.")
    label = (text or "").strip()
    if not label:
        raise InvalidLabel("Type the true label first: one digit from 0 to 9.")
    # Only ASCII: str.isdigit() would also accept "٧" or "７", which the database must not see.
    if len(label) != 1 or label not in DIGITS:
        raise InvalidLabel("The true label must be one digit from 0 to 9.")
    return int(label)


@dataclass(frozen=True)
class Submission:
    """One answer about one drawing, as it will be stored."""

    drawing_digest: str
    predicted_digit: int
    true_label: int
    confidence: float
    submission_id: uuid.UUID

    @property
    def model_was_right(self) -> bool:
        return self.predicted_digit == self.true_label


def submission_for(
    pending: Submission | None,
    drawing_digest: str,
    predicted_digit: int,
    confidence: float,
    true_label: int,
) -> Submission:
    """The pending submission if this is a retry of the same answer, else a new one."""
    if (
        pending is not None
        and pending.drawing_digest == drawing_digest
        and pending.true_label == true_label
    ):
        return pending
    return Submission(
        drawing_digest=drawing_digest,
        predicted_digit=predicted_digit,
        true_label=true_label,
        confidence=confidence,
        submission_id=uuid.uuid4(),
    )


def is_held_out(submission_id: object, prediction_id: int) -> bool:
    """Whether an answer is kept out of training, forever: 1 in 5 submissions, by the SHA-256 of
    its submission id (of its row id when it has none), so every run splits the same way and one
    submission is never on both sides."""
    key = str(submission_id) if submission_id is not None else str(prediction_id)
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0
