"""What only a browser shows: the real app (``streamlit run app.py``, the shipped model) in headless
Chromium, driven with the mouse or a finger, against a real PostgreSQL.

One app process and one PostgreSQL server serve the whole module; the app reaches the server
through a ``TcpProxy``, which the hung-database test makes stop answering. Each test opens new
browser contexts (new Streamlit sessions) and looks only at the rows added since its start.
Screenshots of every step go to test-artifacts/<test name>/.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import re
import shutil
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
import torch
from conftest import aligned_difference, own_server
from mnist_files import PEN_SUBSET
from PIL import Image

import db
import drawings
import model
import pendigits
import ui.analysis
import ui.draw
import ui.session
import utils
from lab import browser
from lab.browser import AppPage, AppProcess
from lab.postgres import PostgresProcess, TcpProxy

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def module_db(pg_template: Path, pg_base_dir: Path):
    """This module's own server (the session's shared one has its table dropped by others)."""
    with own_server(pg_base_dir, pg_template) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(module_db: PostgresProcess):
    proxy = TcpProxy(module_db.port)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def shared_app(proxy: TcpProxy):
    with AppProcess(proxy.url) as process:
        yield process


@pytest.fixture
def open_session(chromium, shared_app: AppProcess, request: pytest.FixtureRequest):
    """open_session(**options) -> a new session of the shared app (options: a phone, setup),
    screenshotted at the end and closed."""
    screenshots = browser.ARTIFACTS / re.sub(r"[^\w.-]+", "-", request.node.name)
    shutil.rmtree(screenshots, ignore_errors=True)
    screenshots.mkdir(parents=True)
    with contextlib.ExitStack() as stack:

        def open_one(**options) -> AppPage:
            page = AppPage.open(chromium, shared_app.url, screenshots, **options)
            stack.callback(page.close)
            stack.callback(page.snap, "end")
            return page

        yield open_one
    assert shared_app.is_running, f"the app died:\n{shared_app.log_text()[-4000:]}"


def last_id(server: PostgresProcess) -> int:
    with server.connect() as conn:
        return conn.execute("SELECT coalesce(max(id), 0) FROM predictions").fetchone()[0]


def rows_after(server: PostgresProcess, baseline: int) -> list[tuple]:
    """(predicted_digit, true_label, confidence %, submission_id) of the rows added since."""
    with server.connect() as conn:
        return conn.execute(
            "SELECT predicted_digit, true_label, confidence * 100, submission_id FROM predictions"
            " WHERE id > %s ORDER BY id",
            (baseline,),
        ).fetchall()


def is_shown(row: tuple, shown: browser.ShownPrediction, true_label: int) -> bool:
    """The row holds the prediction on screen (its confidence shown to 0.1%) and the label."""
    predicted, label, percent, submission_id = row
    same_confidence = abs(percent - shown.confidence_percent) <= 0.05 + 1e-4
    return (predicted, label) == (shown.digit, true_label) and same_confidence and submission_id


def saved_message(true_label: int, shown: browser.ShownPrediction) -> str:
    percent = f"{shown.confidence_percent:.1f}%"
    return f"Saved: you drew a {true_label} (model said {shown.digit}, {percent})."


def draw_and_read(page: AppPage, digit: int, strokes=None) -> browser.ShownPrediction:
    page.draw(strokes or browser.DIGIT_STROKES[digit])
    shown = page.wait_for_prediction()
    page.snap(f"drew-{digit}")
    assert shown.digit == digit, f"a hand-drawn {digit} was read as {shown.digit}"
    assert page.ink_pixels() > 1000, "the drawing is not on the canvas"
    return shown


def assert_blank_for_the_next_drawing(page: AppPage) -> None:
    assert page.ink_pixels() == 0, "the canvas was not cleared"
    assert page.prediction() is None
    assert page.true_label_input().input_value() == ""
    assert page.button(ui.session.CORRECT_BUTTON).is_disabled()


def test_drawings_are_predicted_stored_as_shown_and_the_canvas_starts_afresh(
    open_session, module_db
):
    """A 7 drawn with the mouse is read as a 7 and Correct stores it; the canvas is then blank,
    and the next digit, drawn stroke by stroke while the "Saved" message goes away, stays on
    it; Submit correction stores that one with the typed label."""
    page = open_session()
    baseline = last_id(module_db)
    seven = draw_and_read(page, 7)
    page.click_correct()
    page.snap("correct")
    assert saved_message(7, seven) in page.alerts()
    assert_blank_for_the_next_drawing(page)

    for number, stroke in enumerate(browser.DIGIT_STROKES[4], start=1):
        page.draw([stroke])
        page.snap(f"stroke-{number}")
        assert page.ink_pixels() > 500, f"the canvas is blank after stroke {number}"
    four = page.wait_for_prediction()
    assert four.digit == 4
    page.submit_correction("9")
    page.snap("correction")
    assert saved_message(9, four) in page.alerts()
    assert_blank_for_the_next_drawing(page)
    rows = rows_after(module_db, baseline)
    assert len(rows) == 2 and is_shown(rows[0], seven, 7) and is_shown(rows[1], four, 9), rows


def test_why_opened_on_a_drawing_shows_the_maps_of_its_evidence(open_session):
    """ "Why?" under a 7 drawn with the mouse: three pictures (both models, the image, the
    strokes), each loaded and coloured, with the legend naming the answer."""
    page = open_session()
    draw_and_read(page, 7)
    assert page.why_maps().count() == 0  # closed by default
    page.toggle_why()
    page.snap("why")
    maps = page.why_maps()
    assert maps.count() == 3
    for index in range(3):
        assert maps.nth(index).evaluate("image => image.complete && image.naturalWidth > 0")
    assert page.page.get_by_text("Blue: ink that made it a 7").count() == 1


def test_a_click_that_arrives_after_a_newer_drawing_stores_what_was_on_screen(
    open_session, module_db
):
    """The person sees the prediction for a 1, adds a base to it and presses Correct before the
    new prediction reaches the page, while the server has already analysed the new drawing.
    The row holds the digit and confidence that were on screen (or nothing), never the unseen
    ones."""
    gate = browser.MessageGate()
    page = open_session(setup=gate.install)
    baseline = last_id(module_db)
    shown = draw_and_read(page, 1)
    gate.hold()
    page.draw_held([[(96, 238), (140, 236), (184, 234)]])
    page.release()
    gate.wait_for_finished_runs(page.page, 1)  # analysed on the server, not on screen
    assert page.prediction() == shown
    page.snap("new-drawing-not-shown-yet")
    clicked = page.mark()
    page.button(ui.session.CORRECT_BUTTON).click()
    gate.wait_for_finished_runs(page.page, 2)
    gate.release()
    page.wait_until_idle(clicked)
    page.snap("after-the-click")
    rows = rows_after(module_db, baseline)
    assert len(rows) <= 1 and all(is_shown(row, shown, shown.digit) for row in rows), rows
    # ... and the drawing kept with it is the 1 that was shown: its two strokes, not the base.
    assert [len(row[0]) for row in drawings_after(module_db, baseline)] == [2] * len(rows)


def test_a_page_whose_app_process_is_replaced_reruns_and_its_next_drawing_is_stored(
    chromium, proxy, module_db
):
    """As when swarm replicas die or are updated: the app process stops and a new one serves
    the same address, twice. Each time the page reconnects into a new, empty session and must
    rerun in full there, whatever its last run was (after Correct: a rerun of the drawing area
    alone; after a reconnect: a full run); else that session ignores every drawing (a rerun of
    a fragment it never ran). The next drawing is then predicted and stored once, as shown."""
    with contextlib.ExitStack() as stack:
        app = stack.enter_context(AppProcess(proxy.url))
        page = stack.enter_context(AppPage.open(chromium, app.url))
        page.draw_digit(7)
        page.click_correct()
        for _ in range(2):
            reconnected = page.mark()
            app.stop()
            app = stack.enter_context(AppProcess(proxy.url, port=urlsplit(app.url).port))
            page.wait_until_idle(reconnected, browser.FIRST_RUN_TIMEOUT_MS)  # the page reran
        baseline = last_id(module_db)
        shown = draw_and_read(page, 7)
        page.click_correct()
        rows = rows_after(module_db, baseline)
        assert len(rows) == 1 and is_shown(rows[0], shown, 7), rows


def drawings_after(server: PostgresProcess, baseline: int) -> list[tuple]:
    """(strokes, canvas_size, brush_width, image) of the drawings of the rows added since."""
    with server.connect() as conn:
        return conn.execute(
            "SELECT strokes, canvas_size, brush_width, image FROM drawings"
            " WHERE prediction_id > %s ORDER BY prediction_id",
            (baseline,),
        ).fetchall()


def model_view_shown(page: AppPage, app_url: str) -> np.ndarray:
    """The 28x28 image under "What the model sees", as the page shows it (5x larger)."""
    src = page.page.get_by_test_id("stImage").locator("img").get_attribute("src")
    png = page.page.request.get(urljoin(app_url + "/", src)).body()
    step = ui.analysis.MODEL_VIEW_SIZE // utils.FRAME_SIZE
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"))[::step, ::step]


def distance_to_polyline(point: list[float], line) -> float:
    p = np.asarray(point)
    distances = []
    for a, b in itertools.pairwise(np.asarray(line, dtype=float)):
        t = np.clip(np.dot(p - a, b - a) / max(np.dot(b - a, b - a), 1e-9), 0, 1)
        distances.append(np.linalg.norm(p - (a + t * (b - a))))
    return min(distances)


def test_a_mouse_drawing_is_stored_with_its_strokes_and_the_image_shown(
    open_session, module_db, shared_app
):
    """The page says drawings are kept; Correct stores the 7 drawn with the mouse as its three
    strokes, each point on the line the mouse moved along, with the 28x28 image the page showed; the
    strokes draw back into that image (drawings.model_image: same digit, near the same pixels)."""
    page = open_session()
    assert page.page.get_by_text(ui.draw.DRAWINGS_KEPT).is_visible()
    baseline = last_id(module_db)
    shown = draw_and_read(page, 7)
    view = model_view_shown(page, shared_app.url)
    page.click_correct()
    assert saved_message(7, shown) in page.alerts()

    [(strokes, canvas_size, brush_width, image)] = drawings_after(module_db, baseline)
    assert (canvas_size, brush_width) == (utils.CANVAS_SIZE, utils.BRUSH_WIDTH)
    assert len(strokes) == len(browser.DIGIT_STROKES[7])
    for stroke, moved in zip(strokes, browser.DIGIT_STROKES[7], strict=True):
        assert len(stroke) >= 10  # a point per mouse move, every 4 px at most
        # (mouse events land on whole CSS pixels: up to 0.5 px off in x and in y, each)
        assert max(distance_to_polyline(point, moved) for point in stroke) < 1.5
        assert math.dist(stroke[0], moved[0]) < 1.5 and math.dist(stroke[-1], moved[-1]) < 1.5
    assert np.array_equal(np.frombuffer(image, np.uint8).reshape(28, 28), view)
    drawing = db.Drawing(strokes, canvas_size, brush_width, image)
    again = drawings.model_image(drawing)
    classifier = model.load_model(model.model_path())
    assert model.predict(classifier, utils.normalize(again)[None, None]).digit == shown.digit
    assert aligned_difference(again, view) <= 3.0


def test_strokes_drawn_in_the_browser_read_like_the_tablet_strokes_they_trace(
    open_session, module_db
):
    """Held-out writers' pen digits (a tablet's points, every 100 ms), traced with the mouse along
    the curves the canvas draws through them: to the model of the strokes, the strokes the app
    stores read as the tablet's do (same digit, every probability within 0.05); and the answer
    shown is both models' on exactly the image and strokes stored."""
    classifier = model.load_model(model.model_path())
    assert classifier.trajectory is not None, "the shipped model reads strokes"
    held_out = [d for d in pendigits.load(PEN_SUBSET) if d.writer in pendigits.HELD_OUT_WRITERS]
    digits = [next(d for d in held_out if d.label == label) for label in (4, 8, 9)]
    page = open_session()
    baseline = last_id(module_db)
    for seed, digit in enumerate(digits):
        lines, _ = pendigits.on_canvas(digit.strokes, np.random.default_rng(seed), vary=False)
        traced = [utils.resample(utils.canvas_path(line), spacing=4.0).tolist() for line in lines]
        draw_and_read(page, digit.label, traced)
        page.click_correct()

    stored = drawings_after(module_db, baseline)
    rows = rows_after(module_db, baseline)
    assert len(stored) == len(rows) == len(digits)
    for digit, (strokes, _, _, image), row in zip(digits, stored, rows, strict=True):
        tablet = utils.trajectory([stroke * (1, -1) for stroke in digit.strokes])
        app_drawn = utils.trajectory(strokes)
        with torch.inference_mode():
            expected, found = (
                torch.softmax(classifier.trajectory(trajectory), 1)[0]
                for trajectory in (tablet, app_drawn)
            )
        assert int(found.argmax()) == int(expected.argmax()) == digit.label
        assert float((found - expected).abs().max()) < 0.05
        pixels = utils.normalize(np.frombuffer(image, np.uint8).reshape(28, 28).copy())[None, None]
        answer = model.predict(classifier, pixels, app_drawn)
        assert (row[0], row[2] / 100) == pytest.approx((answer.digit, answer.confidence), 1e-5)


def assert_in_view(locator, viewport: dict[str, int]) -> dict[str, float]:
    """Inside the viewport of a page that is not scrolled: seen without scrolling."""
    box = locator.bounding_box()
    assert box is not None, f"{locator} is not displayed"
    assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], box
    assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], box
    return box


@pytest.mark.parametrize("phone", list(browser.PHONES))
def test_on_a_phone_a_finger_draws_and_the_guess_and_answers_fit_one_screen(
    open_session, module_db, phone
):
    page = open_session(**browser.PHONES[phone])
    viewport = browser.PHONES[phone]["viewport"]
    baseline = last_id(module_db)
    page.touch_draw(browser.DIGIT_STROKES[7])
    shown = page.wait_for_prediction()
    page.snap("drew-7")
    assert shown.digit == 7

    correct = page.button(ui.session.CORRECT_BUTTON)
    canvas, *_, correct_box, label_box, submit_box = [
        assert_in_view(locator, viewport)
        for locator in [
            page.canvas(),
            page.page.locator("h3", has_text="Prediction:"),
            page.page.locator("strong", has_text="Confidence:"),
            correct,
            page.true_label_input(),
            page.button(ui.session.SUBMIT_CORRECTION_BUTTON),
        ]
    ]
    assert (canvas["width"], canvas["height"]) == (utils.CANVAS_SIZE,) * 2
    # A finger on the canvas draws: a strip beside it is left to scroll the page with.
    assert viewport["width"] - (canvas["x"] + canvas["width"]) >= 48
    assert correct_box["x"] + correct_box["width"] <= label_box["x"]  # one row, in order
    assert label_box["x"] + label_box["width"] <= submit_box["x"]
    assert label_box["y"] < correct_box["y"] + correct_box["height"]

    page.tap(correct)
    page.snap("correct")
    rows = rows_after(module_db, baseline)
    assert len(rows) == 1 and is_shown(rows[0], shown, 7), rows
    assert_in_view(page.page.get_by_test_id("stAlert").filter(has_text="Saved:"), viewport)


SESSIONS = 8  # twice the app's pool of PostgreSQL connections
DIGITS = 2


def test_sessions_drawing_and_answering_at_once_each_store_what_they_showed(
    open_session, module_db
):
    """8 sessions of one app in lockstep: in each round all draw a digit holding the mouse
    button at the end, then release it one right after the other (the app gets 8 drawings at
    once); then all answer (Correct or Submit correction) before any reply is awaited. Every
    session shows the prediction for its own drawing, and every answer is stored once, with the
    prediction and confidence its session showed."""
    pages = [open_session() for _ in range(SESSIONS)]
    baseline = last_id(module_db)
    expected = []  # (shown prediction, true label)
    for n in range(DIGITS):
        drawn = [(0, 1, 7)[(index + n) % 3] for index in range(SESSIONS)]
        for page, digit in zip(pages, drawn, strict=True):
            page.draw_held(browser.ONE_STROKE[digit])
        for page in pages:
            page.release()
        shown = []
        for page in pages:
            page.wait_for_drawing()
            shown.append(page.wait_for_prediction())
        assert [prediction.digit for prediction in shown] == drawn  # each its own drawing
        clicked = []
        for index, page in enumerate(pages):
            label = shown[index].digit if (index + n) % 2 else (index + n) % 10
            if (index + n) % 2:
                button = page.button(ui.session.CORRECT_BUTTON)
            else:
                page.type_true_label(str(label))
                button = page.button(ui.session.SUBMIT_CORRECTION_BUTTON)
            expected.append((shown[index], label))
            clicked.append(page.mark())
            button.click()
        for page, since, (prediction, label) in zip(
            pages, clicked, expected[-SESSIONS:], strict=True
        ):
            page.wait_until_idle(since)
            assert saved_message(label, prediction) in page.alerts(), page.alerts()

    rows = rows_after(module_db, baseline)
    assert len(rows) == len(expected) == len({row[3] for row in rows}), rows
    for prediction, label in expected:
        match = next((row for row in rows if is_shown(row, prediction, label)), None)
        assert match, (prediction, label, rows)
        rows.remove(match)


# Set before an action: records whether the page ever showed the "Saving..." notice.
_WATCH_SAVING = """(text) => {
  window.__savingShown = false;
  const observer = new MutationObserver(() => {
    const alerts = [...document.querySelectorAll('[data-testid="stAlert"]')];
    if (alerts.some((alert) => alert.textContent.includes(text))) {
      window.__savingShown = true;
      observer.disconnect();
    }
  });
  observer.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def test_a_hung_database_shows_the_save_then_not_saved_and_the_retry_stores_once(
    open_session, module_db, proxy
):
    """The database stops answering (it accepts connections, says nothing): the page shows that
    the answer is being saved, then that it was not, with the drawing and label kept; once the
    database answers again, the retry stores the answer once."""
    page = open_session()
    baseline = last_id(module_db)
    shown = draw_and_read(page, 7)
    page.type_true_label("1")
    proxy.hang()
    try:
        page.page.evaluate(_WATCH_SAVING, ui.session.SAVING)
        page.submit_correction()
        page.snap("database-hung")
        assert page.page.evaluate("() => window.__savingShown"), "no sign of the save"
        alerts = page.alerts()
        assert ui.session.FEEDBACK_NOT_SAVED in alerts and ui.session.SAVING not in alerts, alerts
        assert ui.draw.DATABASE_DOWN_BANNER in alerts, alerts
        assert page.prediction() == shown
        assert page.true_label_input().input_value() == "1"
        assert page.ink_pixels() > 1000, "the drawing vanished from the canvas"
    finally:
        proxy.forward()
    page.submit_correction()
    page.snap("database-back")
    assert saved_message(1, shown) in page.alerts()
    assert ui.session.FEEDBACK_NOT_SAVED not in page.alerts()
    assert_blank_for_the_next_drawing(page)
    rows = rows_after(module_db, baseline)
    assert len(rows) == 1 and is_shown(rows[0], shown, 1), rows
