"""Fault drills with real processes: bad images, and (marked ``browser``) the database failing
under a real ``streamlit run`` app, and 8 users at once.

Each drill prints what it did (run pytest with ``-s`` to see it).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

import model

ROOT = Path(__file__).resolve().parent.parent


# --- bad input to preprocess: an answer or a clear error, never a crash or a hang ----------------

# Run in a child process: a crash (segfault, abort, out of memory) or a hang in one case is seen
# as such, and named (the case is printed before it runs).
_BAD_INPUT_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    import model, utils

    torch.set_num_threads(1)
    classifier = model.load_model()

    def drawing(size, mode="RGBA"):
        image = Image.new(mode, (size, size), "black")
        pen = ImageDraw.Draw(image)
        points = [(0.25, 0.18), (0.75, 0.18), (0.43, 0.86)]
        points = [(x * size, y * size) for x, y in points]
        pen.line(points, fill="white", width=max(2, size // 15))
        return image

    rng = np.random.default_rng(0)
    noise = lambda shape: rng.integers(0, 256, shape, dtype=np.uint8)
    black, white = np.zeros((280, 280), np.uint8), np.full((280, 280), 255, np.uint8)
    seven = np.asarray(drawing(280))
    big_seven = np.asarray(drawing(5000))
    transparent_big = np.zeros((5000, 5000, 4), np.uint8)
    transparent_big[..., 3] = np.asarray(drawing(5000, "L"))
    line = np.zeros((3, 5000), np.uint8)
    line[1, 500:4500] = 255
    cases = {
        "1x1 grey": lambda: np.zeros((1, 1), np.uint8),
        "1x1 white RGBA": lambda: np.full((1, 1, 4), 255, np.uint8),
        "0x280": lambda: np.zeros((0, 280), np.uint8),
        "280x280 all white RGB": lambda: np.full((280, 280, 3), 255, np.uint8),
        "280x280 all black": lambda: np.zeros((280, 280), np.uint8),
        "280x280 all black RGBA, opaque": lambda: np.dstack([black, black, black, white]),
        "280x280 RGBA, fully transparent": lambda: np.zeros((280, 280, 4), np.uint8),
        "280x280 random noise RGB": lambda: noise((280, 280, 3)),
        "280x280 random noise RGBA": lambda: noise((280, 280, 4)),
        "280x280 drawing of a 7": lambda: seven,
        "5000x5000 drawing of a 7": lambda: big_seven,
        "5000x5000 transparent drawing of a 7": lambda: transparent_big,
        "5000x5000 all white RGBA": lambda: np.full((5000, 5000, 4), 255, np.uint8),
        "5000x5000 all black": lambda: np.zeros((5000, 5000), np.uint8),
        "5000x5000 random noise grey": lambda: noise((5000, 5000)),
        "5000x5000 random noise RGBA": lambda: noise((5000, 5000, 4)),
        "3x5000 line": lambda: line,
        "5000x3 line": lambda: np.ascontiguousarray(line.T),
        "1x5000 white": lambda: np.full((1, 5000), 255, np.uint8),
        "reversed view (negative strides)": lambda: seven[::-1, ::-1],
        "Fortran-ordered": lambda: np.asfortranarray(seven),
        "every other pixel (strided view)": lambda: seven[::2, ::2],
        "float32 in [0, 1]": lambda: seven.astype(np.float32) / 255,
        "float64 0-255": lambda: seven.astype(np.float64),
        "float32 NaN": lambda: np.full((280, 280), np.nan, np.float32),
        "uint16": lambda: seven.astype(np.uint16) * 257,
        "int64": lambda: seven.astype(np.int64),
        "int8": lambda: (seven // 2).astype(np.int8),
        "bool": lambda: seven[..., 0] > 0,
        "2-channel (grey + alpha)": lambda: np.dstack([seven[..., 0], seven[..., 3]]),
        "5-channel": lambda: np.zeros((280, 280, 5), np.uint8),
        "4-D batch": lambda: seven[None],
        "1-D": lambda: np.zeros(280, np.uint8),
        "0-D": lambda: np.uint8(7),
        "nested list": lambda: seven.tolist(),
        "bytes": lambda: b"\\x89PNG",
        "None": lambda: None,
        "PIL LA (grey + alpha)": lambda: drawing(280, "LA"),
        "PIL I;16": lambda: drawing(280, "L").convert("I;16"),
        "PIL F": lambda: drawing(280, "L").convert("F"),
        "PIL CMYK": lambda: drawing(280, "RGB").convert("CMYK"),
        "PIL P (palette)": lambda: drawing(280, "RGB").convert("P"),
        "PIL 1 (bilevel)": lambda: drawing(280, "1"),
    }
    for name, make in cases.items():
        image = make()
        print(json.dumps({"case": name, "start": True}), flush=True)
        start = time.perf_counter()
        try:
            batch = utils.preprocess(image)
            prediction = model.predict(classifier, batch)
            outcome = {"outcome": "prediction", "digit": prediction.digit,
                       "finite": bool(torch.isfinite(batch).all()), "shape": list(batch.shape)}
        except Exception as exc:
            outcome = {"outcome": type(exc).__name__, "message": str(exc)}
        outcome.update(case=name, seconds=time.perf_counter() - start)
        print(json.dumps(outcome), flush=True)
    """
)

EMPTY, FORMAT, PREDICTION = "EmptyImageError", "ImageFormatError", "prediction"
ANY_ANSWER = {EMPTY, PREDICTION}
EXPECTED_OUTCOMES = {
    "1x1 grey": {EMPTY},
    "1x1 white RGBA": {EMPTY},
    "0x280": {EMPTY},
    "280x280 all white RGB": {EMPTY},
    "280x280 all black": {EMPTY},
    "280x280 all black RGBA, opaque": {EMPTY},
    "280x280 RGBA, fully transparent": {EMPTY},
    "280x280 random noise RGB": ANY_ANSWER,
    "280x280 random noise RGBA": ANY_ANSWER,
    "280x280 drawing of a 7": {PREDICTION},
    "5000x5000 drawing of a 7": {PREDICTION},
    "5000x5000 transparent drawing of a 7": {PREDICTION},
    "5000x5000 all white RGBA": {EMPTY},
    "5000x5000 all black": {EMPTY},
    "5000x5000 random noise grey": ANY_ANSWER,
    "5000x5000 random noise RGBA": ANY_ANSWER,
    "3x5000 line": ANY_ANSWER,
    "5000x3 line": ANY_ANSWER,
    "1x5000 white": {EMPTY},
    "reversed view (negative strides)": {PREDICTION},
    "Fortran-ordered": {PREDICTION},
    "every other pixel (strided view)": {PREDICTION},
    "float32 in [0, 1]": {FORMAT},
    "float64 0-255": {FORMAT},
    "float32 NaN": {FORMAT},
    "uint16": {FORMAT},
    "int64": {FORMAT},
    "int8": {FORMAT},
    "bool": {FORMAT},
    "2-channel (grey + alpha)": {FORMAT},
    "5-channel": {FORMAT},
    "4-D batch": {FORMAT},
    "1-D": {FORMAT},
    "0-D": {FORMAT},
    "nested list": {FORMAT},
    "bytes": {FORMAT},
    "None": {FORMAT},
    "PIL LA (grey + alpha)": {PREDICTION},
    "PIL I;16": {PREDICTION},
    "PIL F": {PREDICTION},
    "PIL CMYK": {PREDICTION},
    "PIL P (palette)": {PREDICTION},
    "PIL 1 (bilevel)": {PREDICTION},
}
CASE_TIMEOUT_S = 20  # the slowest case (5000x5000 RGBA) takes ~0.5 s on 2 idle cores


def test_bad_images_give_an_answer_or_a_clear_error_never_a_crash_or_hang(tmp_path):
    log = tmp_path / "bad-input.jsonl"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", _BAD_INPUT_WORKER],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + 60 + CASE_TIMEOUT_S * len(EXPECTED_OUTCOMES)
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        hung = process.poll() is None
        if hung:
            process.kill()
        _, stderr = process.communicate(timeout=30)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    started = [r["case"] for r in records if r.get("start")]
    results = {r["case"]: r for r in records if not r.get("start")}
    unfinished = [case for case in started if case not in results]
    assert not hung, f"hung on {unfinished}"
    assert process.returncode == 0, (
        f"crashed (exit {process.returncode}) on {unfinished}:\n{stderr}"
    )
    assert list(results) == list(EXPECTED_OUTCOMES)

    print("\nbad input to utils.preprocess + model.predict:")
    for case, result in results.items():
        detail = result.get("message") or f"digit {result.get('digit')}"
        print(f"  {case:40} {result['seconds'] * 1000:8.1f} ms  {result['outcome']}: {detail}")
    problems = []
    for case, expected in EXPECTED_OUTCOMES.items():
        result = results[case]
        if result["outcome"] not in expected:
            problems.append(f"{case}: {result['outcome']} {result.get('message', '')}")
        elif result["outcome"] == PREDICTION:
            if not (result["finite"] and result["shape"] == [1, 1, 28, 28]):
                problems.append(f"{case}: model input {result}")
        elif len(result["message"]) < 10:
            problems.append(f"{case}: unclear message {result['message']!r}")
        if result["seconds"] > CASE_TIMEOUT_S:
            problems.append(f"{case}: took {result['seconds']:.1f} s")
    assert not problems, "\n".join(problems)
    # Size does not change what the model sees: the 5000x5000 drawing reads as the 280x280 one.
    small, big = results["280x280 drawing of a 7"], results["5000x5000 drawing of a 7"]
    assert (
        big["digit"] == small["digit"] == results["5000x5000 transparent drawing of a 7"]["digit"]
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims *width* x *height* pixels (its data is one pixel's): what a client can
    send as the canvas's data URL."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])  # IHDR: size, then flags
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@pytest.mark.parametrize(
    "png",
    [
        b"not a png",
        png_header(1, 1)[:40],
        png_header(20_000, 20_000),  # over Pillow's decompression-bomb limit
        png_header(12_000, 12_000),  # a header alone: a truncated image
    ],
    ids=["garbage", "truncated", "over-pillow-bomb-limit", "huge-header-no-data"],
)
def test_an_unreadable_drawing_gives_a_hint_not_an_exception(png):
    import app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        analysis = app.analyse(png, "digest", model.DigitCNN().eval())
    assert analysis.prediction is None and analysis.hint


# --- browser drills: a real `streamlit run` app --------------------------------------------------

# One-stroke digits: tests/test_browser.py covers multi-stroke drawing after a saved answer.
ONE_STROKE = {
    0: None,  # browser.DIGIT_STROKES[0], a single closed oval
    1: [[(150, 52), (146, 100), (141, 150), (137, 200), (134, 236)]],
    7: [[(74, 64), (134, 59), (194, 58), (208, 60), (190, 98), (154, 176), (128, 238)]],
}


def one_stroke(digit: int):
    from lab import browser

    return ONE_STROKE[digit] or browser.DIGIT_STROKES[digit]


def stored_rows(server) -> list[tuple]:
    with server.connect() as conn:
        return conn.execute(
            "SELECT predicted_digit, true_label, confidence, submission_id FROM predictions"
            " ORDER BY id"
        ).fetchall()


def app_log_problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Traceback" in line or "CRITICAL" in line]


@pytest.fixture(scope="module")
def chromium_browser():
    from lab import browser

    try:
        browser.chromium_executable()
    except browser.ChromiumMissing as exc:
        pytest.fail(str(exc))
    with browser.chromium() as instance:
        yield instance


@pytest.mark.browser
def test_database_down_at_startup_crash_restart_and_long_outage(
    chromium_browser, fresh_pg_server, tmp_path
):
    """The app process starts while PostgreSQL is down, the server then comes and goes (a
    crash, a restart while idle, an outage over several retries): predictions never stop, every
    failed answer is kept for a retry, and each answer is stored exactly once. Unicode digits
    typed in the real text field are refused on the way. (tests/test_browser.py covers one
    outage in the middle of a session.)"""
    import app
    from lab import browser

    fresh_pg_server.stop()
    process = browser.AppProcess(fresh_pg_server.url, log_path=tmp_path / "app.log")
    with process:
        page = browser.AppPage.open(chromium_browser, process.url)
        try:
            # 1. No database at startup: the page says so, and still predicts.
            assert app.DATABASE_DOWN_BANNER in page.alerts()
            page.draw(one_stroke(0))
            zero = page.wait_for_prediction()
            page.click_correct()
            assert app.FEEDBACK_NOT_SAVED in page.alerts()
            page.click_correct()  # a second failed retry changes nothing
            assert app.FEEDBACK_NOT_SAVED in page.alerts()
            assert page.prediction() == zero and page.ink_pixels() > 500

            # 2. The database comes up: the same answer, retried, is stored once.
            fresh_pg_server.start()
            page.click_correct()
            assert f"Saved: you drew a {zero.digit}" in " ".join(page.alerts())
            assert app.DATABASE_DOWN_BANNER not in page.alerts()
            assert len(stored_rows(fresh_pg_server)) == 1

            # 3. A crash (immediate stop) and restart while the app is idle: the pooled
            # connections are dead, the next answer is stored at the first attempt.
            fresh_pg_server.stop(mode="immediate")
            fresh_pg_server.start()
            page.draw(one_stroke(7))
            seven = page.wait_for_prediction()
            # Typed in the real text field: Unicode sevens are refused, nothing is stored.
            for text in ("\u0667", "\uff17", "7\u200b", "7; DROP TABLE predictions"):
                page.submit_correction(text)
                assert "The true label must be one digit from 0 to 9." in page.alerts(), text
            assert len(stored_rows(fresh_pg_server)) == 1
            page.submit_correction("7")
            assert app.FEEDBACK_NOT_SAVED not in page.alerts(), page.alerts()
            assert len(stored_rows(fresh_pg_server)) == 2

            # 4. An outage over three retries, a correction typed in between, then back.
            page.draw(one_stroke(1))
            one = page.wait_for_prediction()
            fresh_pg_server.stop()
            page.submit_correction("4")
            page.submit_correction()
            page.submit_correction("1")  # the person changes the label while it is down
            assert app.FEEDBACK_NOT_SAVED in page.alerts()
            assert page.prediction() == one
            fresh_pg_server.start()
            page.submit_correction()
            assert "Saved: you drew a 1" in " ".join(page.alerts()), page.alerts()

            # 5. History works again and lists exactly the three answers.
            page.open_history()
            assert len(page.history_rows()) == 3
        finally:
            page.close()
        rows = stored_rows(fresh_pg_server)
        assert [(p, t) for p, t, _, _ in rows] == [
            (zero.digit, zero.digit),
            (seven.digit, 7),
            (one.digit, 1),
        ]
        assert len({row[3] for row in rows}) == 3
        assert process.is_running, process.log_tail()
    log = process.log_text()
    assert "starting without a database" in log
    assert not app_log_problems(log), app_log_problems(log)


SESSIONS = 16
DIGITS_PER_SESSION = 5


@pytest.mark.browser
def test_sixteen_people_draw_and_submit_five_digits_each_at_once(
    chromium_browser, fresh_pg_server, tmp_path
):
    """16 sessions (browser contexts in one Chromium) of one app process, in lockstep: in each
    round all 16 draw a digit, holding the mouse button down at the end, then release it one
    right after the other, so the app gets the 16 drawings at once; then all 16 answer (Correct
    or Submit correction) before any reply is awaited, more than the pool's connections. Every
    answer is stored exactly once, with the prediction and confidence its own session showed,
    and no page shows an error. (Stroke-to-prediction figures: ``python -m bench``.)"""
    import app
    from lab import browser

    expected: list[tuple[int, int, float]] = []  # (shown prediction, true label, confidence %)
    process = browser.AppProcess(fresh_pg_server.url, log_path=tmp_path / "app.log")
    with process:
        pages = [browser.AppPage.open(chromium_browser, process.url) for _ in range(SESSIONS)]
        started = time.monotonic()
        try:
            for n in range(DIGITS_PER_SESSION):
                digits = [(0, 1, 7)[(index + n) % 3] for index in range(SESSIONS)]
                for page, digit in zip(pages, digits, strict=True):
                    page.draw_held(one_stroke(digit))
                for page in pages:  # all 8 drawings are sent within a few milliseconds
                    page.page.mouse.up()
                released = [page.last_pointer_up_ms() for page in pages]
                shown = []
                for page, up in zip(pages, released, strict=True):
                    page.wait_until_idle(up + browser.CANVAS_DEBOUNCE_MS - 5)
                    shown.append(page.wait_for_prediction())
                labels, clicked = [], []
                for index, page in enumerate(pages):
                    if (index + n) % 2:
                        labels.append((digits[index] + index) % 10)
                        page.type_true_label(str(labels[-1]))
                        button = page.button(app.SUBMIT_CORRECTION_BUTTON)
                    else:
                        labels.append(shown[index].digit)
                        button = page.button(app.CORRECT_BUTTON)
                    clicked.append(page.now_ms())
                    button.click()
                for index, page in enumerate(pages):
                    page.wait_until_idle(clicked[index])
                    alerts = page.alerts()
                    saved = f"Saved: you drew a {labels[index]} (model said {shown[index].digit}"
                    assert any(alert.startswith(saved) for alert in alerts), (index, n, alerts)
                    problems = [a for a in alerts if "not saved" in a or "unavailable" in a]
                    assert not problems and app.DATABASE_DOWN_BANNER not in alerts, alerts
                    expected.append(
                        (shown[index].digit, labels[index], shown[index].confidence_percent)
                    )
        finally:
            for page in pages:
                page.close()
        elapsed = time.monotonic() - started
        assert process.is_running, process.log_tail()

    rows = stored_rows(fresh_pg_server)
    assert len(rows) == SESSIONS * DIGITS_PER_SESSION
    # Each row as its session showed it (the page shows the confidence to 0.1%).
    unmatched = [(p, t, c * 100) for p, t, c, _ in rows]
    for digit, label, percent in expected:
        match = next(
            row
            for row in unmatched
            if row[:2] == (digit, label) and abs(row[2] - percent) <= 0.05 + 1e-4
        )
        unmatched.remove(match)
    assert len({row[3] for row in rows}) == len(rows), "a submission_id stored twice"
    log = process.log_text()
    assert not app_log_problems(log), app_log_problems(log)
    print(f"\n{SESSIONS} sessions x {DIGITS_PER_SESSION} digits in {elapsed:.0f} s")
