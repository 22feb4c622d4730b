"""The real app in headless Chromium: a person draws digits with the mouse and answers.

Each test drives ``streamlit run app.py`` (the shipped model) against a real PostgreSQL through
tests/browser.py, and checks the page and the ``predictions`` table. Screenshots of every step
go to test-artifacts/<test name>/.

Isolation: the tests that never stop the database share one app process and one PostgreSQL
server of this module's own (starting the app costs ~10 s: torch and the model). Each test opens
a new browser context, so a new Streamlit session with its own state, and looks only at the rows
added after the id it read at its start (the History test compares the page with the whole
table). The hung-database test cuts its database off, so it has its own server
(``fresh_pg_server``), reached through a ``TcpProxy``, and its own app process.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PostgresProcess, TcpProxy

import app as app_module
from lab import browser
from lab.browser import AppPage, AppProcess, Screenshots

pytestmark = pytest.mark.browser

TYPE_A_LABEL = "Type the true label first: one digit from 0 to 9."
NOT_ONE_DIGIT = "The true label must be one digit from 0 to 9."


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[browser.Browser]:
    try:
        browser.chromium_executable()
    except browser.ChromiumMissing as exc:
        pytest.fail(str(exc))  # never skipped: CI must run these tests
    with browser.chromium() as instance:
        yield instance


@pytest.fixture(scope="module")
def module_db(pg_template: Path, _pg_base_dir: Path) -> Iterator[PostgresProcess]:
    """A PostgreSQL server for this module's shared app (not the session's shared one, whose
    table other tests drop)."""
    directory = Path(tempfile.mkdtemp(prefix="test_browser-", dir=_pg_base_dir))
    directory.chmod(0o711)
    server = PostgresProcess(directory / "pgdata", template=pg_template)
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="module")
def shared_app(module_db: PostgresProcess) -> Iterator[AppProcess]:
    log_path = browser.artifacts_dir("test_browser") / "shared-app.log"
    log_path.unlink(missing_ok=True)
    with AppProcess(module_db.url, log_path=log_path) as process:
        yield process


def open_session(
    chromium: browser.Browser, process: AppProcess, request: pytest.FixtureRequest
) -> AppPage:
    screenshots = Screenshots(browser.artifacts_dir(request.node.name))
    return AppPage.open(chromium, process.url, screenshots=screenshots)


@pytest.fixture
def page(chromium, shared_app: AppProcess, request: pytest.FixtureRequest) -> Iterator[AppPage]:
    """A new session of the shared app, its first run done; a last screenshot at the end."""
    session = open_session(chromium, shared_app, request)
    yield session
    finish(session, shared_app)


def finish(session: AppPage, process: AppProcess) -> None:
    try:
        session.snap("end")
    finally:
        session.close()
    assert process.is_running, f"the app died; log:\n{process.log_tail()}"


# --- helpers --------------------------------------------------------------------------------


def last_id(server: PostgresProcess) -> int:
    with server.connect() as conn:
        return conn.execute("SELECT coalesce(max(id), 0) FROM predictions").fetchone()[0]


def rows_after(server: PostgresProcess, baseline: int) -> list[tuple]:
    """(predicted_digit, true_label, confidence, submission_id) of the rows added since."""
    with server.connect() as conn:
        return conn.execute(
            "SELECT predicted_digit, true_label, confidence, submission_id FROM predictions"
            " WHERE id > %s ORDER BY id",
            (baseline,),
        ).fetchall()


def saved_message(true_label: int, shown: browser.ShownPrediction) -> str:
    return (
        f"Saved: you drew a {true_label} "
        f"(model said {shown.digit}, {shown.confidence_percent:.1f}%)."
    )


def assert_stored(row: tuple, predicted: int, true_label: int, shown_percent: float) -> None:
    stored_predicted, stored_label, confidence, submission_id = row
    assert (stored_predicted, stored_label) == (predicted, true_label)
    # The page shows the confidence rounded to 0.1%; the table keeps a float4.
    assert abs(confidence * 100 - shown_percent) <= 0.05 + 1e-4, (confidence, shown_percent)
    assert submission_id is not None


def draw_and_read(page: AppPage, digit: int) -> browser.ShownPrediction:
    page.draw_digit(digit)
    shown = page.wait_for_prediction()
    page.snap(f"drew-{digit}")
    assert shown.digit == digit, f"a hand-drawn {digit} was read as {shown.digit}"
    assert page.ink_pixels() > 1000, "the drawing is not on the canvas"
    return shown


def assert_ready_for_a_new_drawing(page: AppPage, generation: int) -> None:
    assert page.canvas_generation() == generation + 1
    assert page.ink_pixels() == 0, "the canvas was not cleared"
    assert page.prediction() is None
    assert app_module.NOTHING_DRAWN in page.alerts()
    assert page.true_label_value() == ""
    assert page.button("correct").is_disabled()


# --- the Draw page --------------------------------------------------------------------------


@pytest.mark.parametrize("digit", [7, 0])
def test_a_drawn_digit_is_predicted_and_correct_stores_it(page, module_db, digit):
    assert page.prediction() is None
    assert page.ink_pixels() == 0
    assert page.button("correct").is_disabled()
    page.snap("blank")
    baseline = last_id(module_db)

    shown = draw_and_read(page, digit)
    assert 0 < shown.confidence_percent <= 100
    assert page.button("correct").is_enabled()
    generation = page.canvas_generation()

    page.click_correct()
    page.snap("correct")
    rows = rows_after(module_db, baseline)
    assert len(rows) == 1, rows
    assert_stored(rows[0], digit, digit, shown.confidence_percent)
    assert saved_message(digit, shown) in page.alerts()
    assert_ready_for_a_new_drawing(page, generation)


def test_submit_correction_stores_the_typed_label(page, module_db):
    baseline = last_id(module_db)
    shown = draw_and_read(page, 1)
    generation = page.canvas_generation()

    page.type_true_label("7")
    page.snap("typed-7")
    page.submit_correction()
    page.snap("submitted")
    rows = rows_after(module_db, baseline)
    assert len(rows) == 1, rows
    assert_stored(rows[0], 1, 7, shown.confidence_percent)
    assert saved_message(7, shown) in page.alerts()
    assert_ready_for_a_new_drawing(page, generation)


def test_an_invalid_true_label_shows_an_error_and_stores_nothing(page, module_db):
    baseline = last_id(module_db)
    shown = draw_and_read(page, 4)
    generation = page.canvas_generation()

    for text, error in [("", TYPE_A_LABEL), ("12", NOT_ONE_DIGIT), ("x", NOT_ONE_DIGIT)]:
        page.submit_correction(text)
        page.snap(f"submitted-{text or 'nothing'}")
        assert error in page.alerts(), (text, page.alerts())
        assert rows_after(module_db, baseline) == []
        # Nothing is reset: the person fixes the label and submits again.
        assert page.true_label_value() == text
        assert page.prediction() == shown
        assert page.canvas_generation() == generation
        assert page.ink_pixels() > 1000, "the drawing vanished from the canvas"


def test_the_next_drawing_stays_on_the_canvas_after_a_saved_answer(page):
    """The "Saved" message above the canvas goes away while the next digit is drawn: the
    drawing must stay on the canvas all along."""
    draw_and_read(page, 0)
    page.click_correct()
    for number, stroke in enumerate(browser.DIGIT_STROKES[4], start=1):
        page.draw([stroke])
        page.snap(f"stroke-{number}")
        assert page.ink_pixels() > 500, f"the canvas is blank after stroke {number}"
    assert page.prediction().digit == 4


def test_a_click_that_arrives_after_a_newer_drawing_stores_what_was_on_screen(
    chromium, shared_app, module_db, request
):
    """The person sees the prediction for a 1, adds a base to it and presses Correct before the
    new prediction reaches the page, while the server has already analysed the new drawing.
    The row holds the digit and confidence that were on screen (or nothing), never the unseen
    ones."""
    gate = browser.MessageGate()
    screenshots = Screenshots(browser.artifacts_dir(request.node.name))
    page = AppPage.open(chromium, shared_app.url, screenshots=screenshots, setup=gate.install)
    try:
        baseline = last_id(module_db)
        shown = draw_and_read(page, 1)
        gate.hold()
        page.draw_held([[(96, 238), (140, 236), (184, 234)]])
        page.page.mouse.up()
        gate.wait_for_finished_runs(page.page, 1)  # analysed on the server, not on screen
        assert page.prediction() == shown
        page.snap("new-drawing-not-shown-yet")
        clicked = page.now_ms()
        page.button(app_module.CORRECT_BUTTON).click()
        gate.wait_for_finished_runs(page.page, 2)
        gate.release()
        page.wait_until_idle(clicked)
        page.snap("after-the-click")
        rows = rows_after(module_db, baseline)
        assert len(rows) <= 1, rows
        for row in rows:
            assert_stored(row, shown.digit, shown.digit, shown.confidence_percent)
    finally:
        finish(page, shared_app)


# --- on a phone -----------------------------------------------------------------------------


def box_of(locator) -> dict[str, float]:
    box = locator.bounding_box()
    assert box is not None, f"{locator} is not displayed"
    return box


def assert_on_screen(box: dict[str, float], viewport: dict[str, int]) -> None:
    """Inside the viewport of a page that is not scrolled: seen without scrolling."""
    assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], box
    assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], box


@pytest.mark.parametrize("phone", list(browser.PHONES))
def test_on_a_phone_the_guess_and_the_feedback_row_fit_one_screen(
    chromium, shared_app, module_db, request, phone
):
    screenshots = Screenshots(browser.artifacts_dir(request.node.name))
    session = AppPage.open(
        chromium, shared_app.url, screenshots=screenshots, **browser.PHONES[phone]
    )
    try:
        baseline = last_id(module_db)
        session.touch_draw(browser.DIGIT_STROKES[7])
        shown = session.wait_for_prediction()
        session.snap("drew-7")
        assert shown.digit == 7

        viewport = browser.PHONES[phone]["viewport"]
        correct = session.button("correct")
        shown_parts = [
            session.canvas(),
            session.page.locator("h3", has_text="Prediction:"),
            session.page.locator("strong", has_text="Confidence:"),
            correct,
            session.true_label_input(),
            session.button("submit_correction"),
        ]
        boxes = [box_of(locator) for locator in shown_parts]
        for box in boxes:
            assert_on_screen(box, viewport)
        canvas_box = boxes[0]
        assert (canvas_box["width"], canvas_box["height"]) == (app_module.CANVAS_SIZE,) * 2
        # A finger on the canvas draws: a strip beside it is left to scroll the page with.
        assert viewport["width"] - (canvas_box["x"] + canvas_box["width"]) >= 48
        correct_box, label_box, submit_box = boxes[-3:]
        assert correct_box["x"] + correct_box["width"] <= label_box["x"]  # one row, in order
        assert label_box["x"] + label_box["width"] <= submit_box["x"]
        assert label_box["y"] < correct_box["y"] + correct_box["height"]

        session.tap(correct)
        session.snap("correct")
        rows = rows_after(module_db, baseline)
        assert len(rows) == 1, rows
        assert_stored(rows[0], 7, 7, shown.confidence_percent)
        saved = session.page.locator('[data-testid="stAlert"]', has_text="Saved:")
        assert_on_screen(box_of(saved), viewport)
    finally:
        finish(session, shared_app)


# --- the History page -----------------------------------------------------------------------


def test_history_lists_the_answers_newest_first(page, module_db):
    seven = draw_and_read(page, 7)
    page.click_correct()
    zero = draw_and_read(page, 0)
    page.submit_correction("6")

    page.open_history()
    page.snap("history")
    with module_db.connect() as conn:
        stored = conn.execute(
            "SELECT created_at, predicted_digit, true_label, confidence, model FROM predictions"
            " ORDER BY created_at DESC, id DESC"
        ).fetchall()

    # st.dataframe paints its cells on a canvas; history_rows reads the grid's accessible
    # table, which holds the raw values of the rows in view (all of them here).
    listed = page.history_rows()
    assert len(listed) == len(stored) >= 2
    newest = [(row.predicted, row.true_label) for row in listed[:2]]
    assert newest == [(0, 6), (7, 7)]
    assert abs(listed[0].confidence_percent - zero.confidence_percent) <= 0.05 + 1e-4
    assert abs(listed[1].confidence_percent - seven.confidence_percent) <= 0.05 + 1e-4
    for row, (created_at, predicted, true_label, confidence, model) in zip(
        listed, stored, strict=True
    ):
        assert (row.predicted, row.true_label, row.model) == (predicted, true_label, model)
        assert abs(row.confidence_percent - confidence * 100) < 1e-3
        assert abs((row.time - created_at).total_seconds()) < 1  # shown to the second
    times = [row.time for row in listed]
    assert times == sorted(times, reverse=True)

    right = sum(predicted == true_label for _, predicted, true_label, _, _ in stored)
    assert page.metric("Answers stored") == str(len(stored))
    assert page.metric("Model accuracy") == f"{right / len(stored):.1%}"


# --- the database goes away -----------------------------------------------------------------


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
    chromium, fresh_pg_server: PostgresProcess, request
):
    """The database stops answering (it accepts connections, says nothing): the page shows that
    the answer is being saved, then that it was not, with the drawing and label kept; once the
    database answers again, the retry stores the answer once."""
    proxy = TcpProxy(fresh_pg_server.port)
    log_path = browser.artifacts_dir(request.node.name) / "app.log"
    log_path.unlink(missing_ok=True)
    with AppProcess(proxy.url, log_path=log_path) as process:
        page = open_session(chromium, process, request)
        try:
            shown = draw_and_read(page, 7)
            generation = page.canvas_generation()
            page.type_true_label("1")

            proxy.hang()
            page.page.evaluate(_WATCH_SAVING, app_module.SAVING)
            page.submit_correction()
            page.snap("database-hung")
            assert page.page.evaluate("() => window.__savingShown"), "no sign of the save"
            alerts = page.alerts()
            assert app_module.FEEDBACK_NOT_SAVED in alerts, alerts
            assert app_module.DATABASE_DOWN_BANNER in alerts, alerts
            assert app_module.SAVING not in alerts, alerts
            assert page.prediction() == shown
            assert page.true_label_value() == "1"
            assert page.canvas_generation() == generation
            ink_while_down = page.ink_pixels()  # asserted at the end: the retry matters too

            proxy.forward()
            page.submit_correction()
            page.snap("database-back")
            rows = rows_after(fresh_pg_server, 0)
            assert len(rows) == 1, rows
            assert_stored(rows[0], 7, 1, shown.confidence_percent)
            assert saved_message(1, shown) in page.alerts()
            assert app_module.FEEDBACK_NOT_SAVED not in page.alerts()
            assert_ready_for_a_new_drawing(page, generation)
            assert ink_while_down > 1000, "the drawing vanished from the canvas when saving failed"
        finally:
            finish(page, process)
            proxy.close()
