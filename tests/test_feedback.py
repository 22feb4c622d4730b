"""feedback.parse_true_label: whatever a person types, it reads one ASCII digit or refuses with a
message. (The database layer refuses anything but an int from 0 to 9 on its own: test_db.py.)"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import feedback

# Digits that are not ASCII, digit look-alikes, invisible and exotic whitespace, SQL fragments.
NASTY = [
    "\u0667",  # ARABIC-INDIC DIGIT SEVEN: str.isdigit() and int() accept it
    "\uff17",  # FULLWIDTH DIGIT SEVEN
    "\U0001d7d5",  # MATHEMATICAL BOLD DIGIT SEVEN
    "\u2077",  # SUPERSCRIPT SEVEN
    "\u2466",  # CIRCLED DIGIT SEVEN
    "7\ufe0f\u20e3",  # keycap 7
    "7\u0301",  # 7 + combining acute accent
    "\u200b7",  # zero-width space, not whitespace for str.strip
    "\ufeff7",  # byte-order mark
    "7\x00",
    "\u00a07\u00a0",  # no-break spaces (whitespace: accepted as 7)
    "\u30007\u2003",  # ideographic and em spaces (whitespace: accepted as 7)
    "\t7\r\n",
    "\u20287\u2029",  # line and paragraph separators
    "07",
    "7.0",
    "+7",
    "-0",
    "\u00bd",  # VULGAR FRACTION ONE HALF (numeric, not a digit)
    "7; DROP TABLE predictions; --",
    "7' OR '1'='1",
    "7" * 10_000,
    " " * 10 + "7",  # one digit, but longer than the text input holds
    "",
    " ",
    None,
]

ANY_DIGIT = st.characters(categories=["Nd"])  # every Unicode decimal digit, ASCII or not
SPACE = st.text(st.characters(categories=["Zs", "Zl", "Zp", "Cc", "Cf"]), max_size=5)
LABELS = st.one_of(
    st.text(),
    st.builds(lambda before, digit, after: before + digit + after, SPACE, ANY_DIGIT, SPACE),
    st.builds(lambda a, b: a + b, ANY_DIGIT, ANY_DIGIT),
)


def expected_label(text: str | None) -> int | None:
    """The digit if *text* is one ASCII digit with only whitespace (str.isspace) around it, in
    at most feedback.MAX_LABEL_CHARS characters, else None."""
    if text is not None and len(text) > feedback.MAX_LABEL_CHARS:
        return None
    core = [char for char in (text or "") if not char.isspace()]
    return int(core[0]) if len(core) == 1 and core[0] in "0123456789" else None


def with_examples(texts):
    def decorate(test):
        for text in texts:
            test = example(text)(test)
        return test

    return decorate


@with_examples(NASTY)
@settings(max_examples=500, deadline=None)
@given(text=LABELS)
def test_parse_true_label_reads_one_ascii_digit_and_refuses_the_rest(text):
    want = expected_label(text)
    if want is None:
        with pytest.raises(feedback.InvalidLabel, match="one digit from 0 to 9"):
            feedback.parse_true_label(text)
    else:
        label = feedback.parse_true_label(text)
        assert type(label) is int and label == want
