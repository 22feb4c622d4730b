"""Fuzzing the true label on its way to the database: whatever a person types, only a single
ASCII digit is ever stored.

Each typed text goes the app's way (feedback.parse_true_label, feedback.submission_for,
db.log_prediction) into a real PostgreSQL; the table is then read back.
"""

from __future__ import annotations

import unicodedata
import uuid

import pytest
from conftest import PostgresProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import db
import feedback

ASCII_DIGITS = "0123456789"

# Digits that are not ASCII, digit look-alikes, invisible and exotic whitespace, SQL fragments.
NASTY = [
    "\u0667",  # ARABIC-INDIC DIGIT SEVEN
    "\uff17",  # FULLWIDTH DIGIT SEVEN
    "\u06f7",  # EXTENDED ARABIC-INDIC DIGIT SEVEN
    "\u096d",  # DEVANAGARI DIGIT SEVEN
    "\U0001d7d5",  # MATHEMATICAL BOLD DIGIT SEVEN
    "\u2077",  # SUPERSCRIPT SEVEN
    "\u2087",  # SUBSCRIPT SEVEN
    "\u2166",  # ROMAN NUMERAL SEVEN
    "\u2466",  # CIRCLED DIGIT SEVEN
    "7\ufe0f\u20e3",  # keycap 7
    "7\u0301",  # 7 + combining acute accent
    "\u200b7",  # zero-width space, not whitespace for str.strip
    "7\u200d",  # zero-width joiner
    "\ufeff7",  # byte-order mark
    "7\x00",
    "\x007",
    "\u00a07\u00a0",  # no-break spaces (whitespace: accepted as 7)
    "\u30007\u2003",  # ideographic and em spaces (whitespace: accepted as 7)
    "\t7\r\n",
    "\u20287\u2029",  # line and paragraph separators
    "\x0b7\x0c",
    "07",
    "7.0",
    "+7",
    "-0",
    "0x7",
    "1e0",
    "\u00bd",  # VULGAR FRACTION ONE HALF (numeric, not a digit)
    "7; DROP TABLE predictions; --",
    "7' OR '1'='1",
    "'); DELETE FROM predictions; --",
    "7); INSERT INTO predictions VALUES (1, now(), 1, 1, 1, NULL); --",
    "$$7$$",
    "7" * 10_000,
    " " * 10_000 + "7" + "\n" * 10_000,
    "\u0667" * 100_000,
    "",
    " ",
    None,
]

ANY_DIGIT = st.characters(categories=["Nd"])  # every Unicode decimal digit, ASCII or not
SPACE = st.text(st.characters(categories=["Zs", "Zl", "Zp", "Cc", "Cf"]), max_size=5)
LABELS = st.one_of(
    st.sampled_from(NASTY),
    st.text(),
    st.text(min_size=1000, max_size=5000),
    st.builds(lambda before, digit, after: before + digit + after, SPACE, ANY_DIGIT, SPACE),
    st.builds(lambda a, b: a + b, ANY_DIGIT, ANY_DIGIT),
)


def expected_label(text: str | None) -> int | None:
    """What may be stored for *text*: the digit if the text is one ASCII digit with only
    whitespace (str.isspace) around it, in at most feedback.MAX_LABEL_CHARS characters, else
    nothing."""
    if text is not None and len(text) > feedback.MAX_LABEL_CHARS:
        return None
    core = [char for char in (text or "") if not char.isspace()]
    if len(core) != 1 or core[0] not in ASCII_DIGITS:
        return None
    # ...and the whitespace is only around it, never inside (one char: nothing inside).
    return int(core[0])


def stored_rows(server: PostgresProcess) -> dict[uuid.UUID, int]:
    with server.connect() as conn:
        rows = conn.execute("SELECT submission_id, true_label FROM predictions").fetchall()
    return dict(rows)


def test_only_a_single_ascii_digit_is_ever_stored(clean_db: PostgresProcess):
    expected: dict[uuid.UUID, int] = {}
    rejected = 0

    @settings(
        max_examples=400,
        deadline=None,
        database=None,  # the table is re-read at the end: no replay of old examples
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    # The confidence is the top softmax probability of 10 classes: from 0.1 to 1.
    @given(text=LABELS, predicted=st.integers(0, 9), confidence=st.floats(0.1, 1))
    def type_label(text: str | None, predicted: int, confidence: float) -> None:
        nonlocal rejected
        try:
            label = feedback.parse_true_label(text)
        except feedback.InvalidLabel as exc:
            assert str(exc), "the error must tell the person what to type"
            assert expected_label(text) is None, f"{text!r} was rejected"
            rejected += 1
            return
        assert type(label) is int and str(label) in ASCII_DIGITS
        assert label == expected_label(text), f"{text!r} was read as {label}"
        submission = feedback.submission_for(None, "digest", predicted, confidence, label)
        db.log_prediction(
            submission.predicted_digit,
            submission.true_label,
            submission.confidence,
            submission_id=submission.submission_id,
        )
        expected[submission.submission_id] = label

    type_label()

    stored = stored_rows(clean_db)
    assert stored == expected
    assert set(stored.values()) <= set(range(10))
    assert expected and rejected, "both accepted and rejected texts must have been tried"


@pytest.mark.parametrize(
    "text", [t for t in NASTY if t is not None], ids=lambda t: ascii(t)[1:-1][:24] or "empty"
)
def test_nasty_labels(clean_db: PostgresProcess, text: str):
    """The hand-picked cases, each on its own (hypothesis may not draw all of them)."""
    want = expected_label(text)
    if want is None:
        with pytest.raises(feedback.InvalidLabel):
            feedback.parse_true_label(text)
        assert stored_rows(clean_db) == {}
        return
    label = feedback.parse_true_label(text)
    assert label == want
    sid = uuid.uuid4()
    db.log_prediction(3, label, 0.5, submission_id=sid)
    assert stored_rows(clean_db) == {sid: want}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=st.one_of(st.text(), st.sampled_from(NASTY), st.floats(), st.booleans()))
def test_the_database_layer_refuses_unparsed_labels(clean_db: PostgresProcess, value):
    """The second line of defence: text (or a float, or a bool) handed straight to
    db.log_prediction is refused before the database is touched, so nothing is stored."""
    with pytest.raises(ValueError):
        db.log_prediction(1, value, 0.5, submission_id=uuid.uuid4())
    assert stored_rows(clean_db) == {}


@pytest.mark.parametrize("confidence", [1e-46, 5e-324, 1e-45])
def test_a_tiny_confidence_is_stored_at_the_columns_precision(clean_db, confidence):
    db.log_prediction(1, 1, confidence)
    [row] = db.recent_predictions()
    assert row["confidence"] == pytest.approx(confidence, abs=1e-45)


def test_unicode_digits_really_are_digits_to_python():
    """Why the parser must check ASCII itself: these pass str.isdigit() and int()."""
    for text in ("\u0667", "\uff17", "\u06f7", "\u096d", "\U0001d7d5"):
        assert text.isdigit() and int(text) == 7 and unicodedata.digit(text) == 7
