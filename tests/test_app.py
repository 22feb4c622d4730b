"""The Streamlit app (app.py) and its feedback logic (feedback.py), against real PostgreSQL.

The app runs in Streamlit's AppTest. A drawing is injected the way the browser sends it: the
canvas component's value set in session_state under the canvas key (see fixtures_app).
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import uuid
from pathlib import Path

import fixtures_app
import numpy as np
import pandas as pd
import pytest
import streamlit as st
import torch
from conftest import ROOT, PostgresProcess
from PIL import Image
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest

import app
import db
import feedback
import model
import utils

APP_FILE = ROOT / "app.py"
NO_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/postgres"

ACCEPTED_LABELS = [("7", 7), (" 7 ", 7), ("0", 0), ("9", 9)]
REJECTED_LABELS = ["", "12", "x", "-1", "7.5", "\u0667", "\uff17", " ", "1 2"]  # ٧ and ７


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_app(monkeypatch: pytest.MonkeyPatch):
    """Fresh process-wide caches; a test that forgets to point db at a server sees it down
    (instead of starting the embedded PostgreSQL in data/postgres)."""
    monkeypatch.setenv("DATABASE_URL", NO_DATABASE_URL)
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


@pytest.fixture
def model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = fixtures_app.save_untrained_model(tmp_path / "model.pth")
    monkeypatch.setenv("MODEL_PATH", str(path))
    return path


@pytest.fixture
def draw_app(clean_db: PostgresProcess, model_file: Path) -> AppTest:
    return start_app()


def start_app() -> AppTest:
    at = AppTest.from_file(str(APP_FILE), default_timeout=30).run()
    assert not at.exception
    return at


def canvas_key(at: AppTest) -> str:
    return f"canvas-{at.session_state[app.CANVAS_GENERATION]}"


def draw(at: AppTest, png: bytes) -> AppTest:
    at.session_state[canvas_key(at)] = fixtures_app.canvas_value(png)
    at.run()
    assert not at.exception
    return at


def feedback_key(at: AppTest, name: str) -> str:
    """The key of a feedback widget for the drawing on screen (app.feedback_key)."""
    analysis = at.session_state[app.ANALYSIS] if app.ANALYSIS in at.session_state else None  # noqa: SIM401 (no .get)
    return app.feedback_key(name, analysis)


def button(at: AppTest, name: str):
    return at.button(key=feedback_key(at, name))


def label_input(at: AppTest):
    return at.text_input(key=feedback_key(at, app.TRUE_LABEL_INPUT))


def click(at: AppTest, name: str) -> AppTest:
    button(at, name).click().run()
    assert not at.exception
    return at


def submit_label(at: AppTest, text: str) -> AppTest:
    label_input(at).input(text)
    return click(at, app.SUBMIT_CORRECTION_BUTTON)


def history_app() -> AppTest:
    """The History page alone (AppTest switches only to pages that are files)."""
    at = AppTest.from_string("import app\napp.history_page()", default_timeout=30).run()
    assert not at.exception
    return at


def chart_data(chart) -> pd.DataFrame:
    """The data of a Vega-Lite chart (one data set)."""
    (dataset,) = chart.proto.datasets
    return convert_arrow_bytes_to_pandas_df(dataset.data.data)


def values(elements) -> list[str]:
    return [element.value for element in elements]


def shown_predictions(at: AppTest) -> list[str]:
    return [text for text in values(at.subheader) if text.startswith("Prediction:")]


def expected_prediction(model_path: Path, png: bytes) -> model.Prediction:
    classifier = model.load_model(model_path)
    image = np.asarray(Image.open(io.BytesIO(png)))
    return model.predict(classifier, utils.preprocess(image))


def stored_rows(server: PostgresProcess) -> list[tuple]:
    with server.connect() as conn:
        return conn.execute(
            "SELECT predicted_digit, true_label, confidence, submission_id"
            " FROM predictions ORDER BY id"
        ).fetchall()


def assert_nothing_reset(at: AppTest, label: str) -> None:
    assert at.session_state[app.CANVAS_GENERATION] == 0
    assert label_input(at).value == label
    assert len(shown_predictions(at)) == 1


def assert_reset(at: AppTest) -> None:
    assert at.session_state[app.CANVAS_GENERATION] == 1
    assert label_input(at).value == ""
    assert shown_predictions(at) == []
    assert app.NOTHING_DRAWN in values(at.info)
    assert app.PENDING_SUBMISSION not in at.session_state
    assert app.ANALYSIS not in at.session_state
    assert button(at, app.CORRECT_BUTTON).disabled


# --- feedback.py ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "digit"), ACCEPTED_LABELS)
def test_parse_true_label_accepts_one_ascii_digit(text, digit):
    assert feedback.parse_true_label(text) == digit


@pytest.mark.parametrize("text", [*REJECTED_LABELS, None])
def test_parse_true_label_rejects_everything_else(text):
    with pytest.raises(feedback.InvalidLabel):
        feedback.parse_true_label(text)


def test_a_retry_of_the_same_answer_keeps_its_submission_id():
    first = feedback.submission_for(None, "drawing-a", 7, 0.9, true_label=7)
    assert first.submission_id.version == 4
    assert feedback.submission_for(first, "drawing-a", 7, 0.9, true_label=7) is first
    other_label = feedback.submission_for(first, "drawing-a", 7, 0.9, true_label=1)
    other_drawing = feedback.submission_for(first, "drawing-b", 7, 0.9, true_label=7)
    ids = {first.submission_id, other_label.submission_id, other_drawing.submission_id}
    assert len(ids) == 3
    assert (other_label.true_label, other_drawing.drawing_digest) == (1, "drawing-b")


# --- draw page: prediction --------------------------------------------------------------------


def test_pages_and_title(draw_app):
    pages = {
        page["page_name"]: page["url_pathname"] for page in draw_app._registered_pages.values()
    }
    assert pages == {"Draw": "", "History": "history"}  # Draw is the default page
    assert values(draw_app.title) == ["MNIST Digit Classifier"]


def test_blank_canvas_shows_a_hint_and_disables_feedback(draw_app):
    assert values(draw_app.info) == [app.NOTHING_DRAWN]
    assert shown_predictions(draw_app) == []
    assert draw_app.get("vega_lite_chart") == []
    assert button(draw_app, app.CORRECT_BUTTON).disabled
    assert button(draw_app, app.SUBMIT_CORRECTION_BUTTON).disabled
    assert label_input(draw_app).disabled


@pytest.mark.parametrize(
    ("png", "hint"),
    [
        (fixtures_app.drawing_png([]), "Nothing is drawn yet"),  # ink drawn, then undone
        (fixtures_app.drawing_png([[(140, 140), (141, 141)]]), "only a dot"),
    ],
    ids=["blank", "dot"],
)
def test_drawing_without_a_digit_shows_the_preprocessing_hint(draw_app, png, hint):
    draw(draw_app, png)
    assert [text for text in values(draw_app.info) if hint in text]
    assert shown_predictions(draw_app) == []
    assert button(draw_app, app.CORRECT_BUTTON).disabled


def test_cleared_canvas_shows_the_start_hint(draw_app):
    draw(draw_app, fixtures_app.digit_png(7))
    draw_app.session_state[canvas_key(draw_app)] = fixtures_app.blank_canvas_value()
    draw_app.run()
    assert values(draw_app.info) == [app.NOTHING_DRAWN]
    assert shown_predictions(draw_app) == []
    assert button(draw_app, app.CORRECT_BUTTON).disabled


def test_drawing_shows_prediction_confidence_probabilities_and_model_view(draw_app, model_file):
    png = fixtures_app.digit_png(7)
    expected = expected_prediction(model_file, png)

    draw(draw_app, png)

    assert shown_predictions(draw_app) == [f"Prediction: {expected.digit}"]
    assert f"**Confidence: {expected.confidence:.1%}**" in values(draw_app.markdown)
    (chart,) = draw_app.get("vega_lite_chart")
    table = chart_data(chart)
    assert list(table["digit"]) == [str(digit) for digit in range(10)]
    assert list(table["probability"]) == pytest.approx(expected.probabilities)
    (image,) = draw_app.get("image")
    assert image.proto.imgs[0].url.endswith(".png")  # lossless, so the pixels stay crisp
    assert not button(draw_app, app.CORRECT_BUTTON).disabled
    assert not label_input(draw_app).disabled


def test_model_view_is_the_28x28_input_upscaled_with_nearest_neighbour():
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[3, 5] = 200
    view = np.asarray(Image.open(io.BytesIO(app.model_view_png(pixels))))
    assert view.shape == (app.MODEL_VIEW_SIZE, app.MODEL_VIEW_SIZE)
    assert set(np.unique(view)) == {0, 200}  # no blur
    assert (view[15:20, 25:30] == 200).all() and view[15:20, 24].max() == 0


def test_an_unchanged_drawing_is_predicted_once(draw_app, caplog):
    caplog.set_level(logging.INFO, logger="app")

    def predictions_logged() -> int:
        return sum(r.name == "app" and r.message.startswith("predicted") for r in caplog.records)

    draw(draw_app, fixtures_app.digit_png(7))
    draw_app.run()
    draw(draw_app, fixtures_app.digit_png(7))  # the canvas sends the same image again
    assert predictions_logged() == 1
    assert " ms" in next(r.message for r in caplog.records if r.message.startswith("predicted"))
    draw(draw_app, fixtures_app.digit_png(1))
    assert predictions_logged() == 2


def test_the_model_is_loaded_once_per_process(clean_db, model_file, caplog):
    caplog.set_level(logging.INFO, logger="app")
    for _ in range(2):  # two browser sessions
        draw(start_app(), fixtures_app.digit_png(4)).run()
    loads = [r for r in caplog.records if r.message.startswith("loaded model")]
    assert len(loads) == 1


# --- draw page: feedback ----------------------------------------------------------------------


def test_correct_stores_the_predicted_digit_with_the_model_confidence(
    draw_app, clean_db, model_file, caplog
):
    caplog.set_level(logging.INFO, logger="app")
    png = fixtures_app.digit_png(7)
    expected = expected_prediction(model_file, png)

    click(draw(draw_app, png), app.CORRECT_BUTTON)

    [(predicted, true_label, confidence, submission_id)] = stored_rows(clean_db)
    assert (predicted, true_label) == (expected.digit, expected.digit)
    assert confidence == pytest.approx(expected.confidence, rel=1e-6)
    assert isinstance(submission_id, uuid.UUID)
    assert values(draw_app.success) == [
        f"Saved: you drew a {expected.digit} "
        f"(model said {expected.digit}, {expected.confidence:.1%})."
    ]
    assert_reset(draw_app)
    assert [r for r in caplog.records if r.message.startswith("stored feedback id=")]


def test_submit_correction_stores_the_typed_label(draw_app, clean_db, model_file):
    png = fixtures_app.digit_png(4)
    expected = expected_prediction(model_file, png)
    true_label = (expected.digit + 1) % 10

    submit_label(draw(draw_app, png), f" {true_label} ")

    [(predicted, stored_label, confidence, _)] = stored_rows(clean_db)
    assert (predicted, stored_label) == (expected.digit, true_label)
    assert confidence == pytest.approx(expected.confidence, rel=1e-6)
    assert values(draw_app.success) == [
        f"Saved: you drew a {true_label} (model said {expected.digit}, {expected.confidence:.1%})."
    ]
    assert_reset(draw_app)
    assert draw_app.error == []


def test_an_answer_records_the_model_that_made_the_prediction(draw_app, clean_db, model_file):
    def name_of_the_file() -> str:
        return f"model.pth@{hashlib.sha256(model_file.read_bytes()).hexdigest()[:12]}"

    first = name_of_the_file()
    click(draw(draw_app, fixtures_app.digit_png(7)), app.CORRECT_BUTTON)
    fixtures_app.save_untrained_model(model_file, seed=1)  # retrained while the app runs
    click(draw(draw_app, fixtures_app.digit_png(1)), app.CORRECT_BUTTON)

    with clean_db.connect() as conn:
        names = [row[0] for row in conn.execute("SELECT model FROM predictions ORDER BY id")]
    assert names == [first, name_of_the_file()]
    assert first != names[1]


@pytest.mark.parametrize(("text", "digit"), ACCEPTED_LABELS)
def test_accepted_labels_are_stored(draw_app, clean_db, text, digit):
    submit_label(draw(draw_app, fixtures_app.digit_png(1)), text)
    assert [row[1] for row in stored_rows(clean_db)] == [digit]
    assert_reset(draw_app)


@pytest.mark.parametrize("text", REJECTED_LABELS)
def test_rejected_labels_show_an_error_and_store_nothing(draw_app, clean_db, text):
    submit_label(draw(draw_app, fixtures_app.digit_png(7)), text)

    [error] = values(draw_app.error)
    assert "one digit from 0 to 9" in error
    assert stored_rows(clean_db) == []
    assert_nothing_reset(draw_app, label=text)
    assert draw_app.success == []

    submit_label(draw_app, "3")  # the error goes once the label is valid
    assert draw_app.error == []
    assert [row[1] for row in stored_rows(clean_db)] == [3]


def test_a_new_drawing_clears_the_previous_error(draw_app):
    submit_label(draw(draw_app, fixtures_app.digit_png(7)), "x")
    assert draw_app.error
    draw(draw_app, fixtures_app.digit_png(1))
    assert draw_app.error == []


def test_database_down_keeps_the_drawing_and_the_retry_stores_once(fresh_pg_server, model_file):
    db.configure(fresh_pg_server.url)
    at = draw(start_app(), fixtures_app.digit_png(7))
    label_input(at).input("3")

    fresh_pg_server.stop()
    click(at, app.SUBMIT_CORRECTION_BUTTON)
    [error] = values(at.error)
    assert "not saved: database unreachable" in error
    assert_nothing_reset(at, label="3")
    pending = at.session_state[app.PENDING_SUBMISSION]
    assert pending.true_label == 3

    click(at, app.SUBMIT_CORRECTION_BUTTON)  # still down: the same submission is still pending
    assert "not saved: database unreachable" in values(at.error)[0]
    assert at.session_state[app.PENDING_SUBMISSION].submission_id == pending.submission_id

    fresh_pg_server.start()
    click(at, app.SUBMIT_CORRECTION_BUTTON)
    assert values(at.success)[0].startswith("Saved: you drew a 3 ")
    assert at.error == []
    assert [(row[1], row[3]) for row in stored_rows(fresh_pg_server)] == [
        (3, pending.submission_id)
    ]
    assert_reset(at)


def test_a_retry_after_a_lost_reply_stores_one_row(fresh_pg_server, model_file):
    db.configure(fresh_pg_server.url)
    at = draw(start_app(), fixtures_app.digit_png(7))
    fresh_pg_server.stop()
    click(at, app.CORRECT_BUTTON)
    assert "not saved: database unreachable" in values(at.error)[0]
    pending = at.session_state[app.PENDING_SUBMISSION]

    # The first attempt did reach the database; only its reply was lost.
    fresh_pg_server.start()
    db.log_prediction(
        pending.predicted_digit, pending.true_label, pending.confidence, pending.submission_id
    )
    click(at, app.CORRECT_BUTTON)

    assert values(at.success)
    assert [row[3] for row in stored_rows(fresh_pg_server)] == [pending.submission_id]


def test_database_down_at_startup_still_predicts_and_feedback_retries(fresh_pg_server, model_file):
    fresh_pg_server.stop()
    db.configure(fresh_pg_server.url)
    at = start_app()
    assert values(at.warning) == [app.DATABASE_DOWN_BANNER]

    draw(at, fixtures_app.digit_png(7))
    assert len(shown_predictions(at)) == 1
    click(at, app.CORRECT_BUTTON)
    assert "not saved: database unreachable" in values(at.error)[0]

    fresh_pg_server.start()  # empty: the table does not exist yet
    click(at, app.CORRECT_BUTTON)
    assert values(at.success)
    assert len(stored_rows(fresh_pg_server)) == 1
    assert at.warning == []


def test_a_busy_database_keeps_the_answer_and_says_busy_not_down(clean_db, model_file, monkeypatch):
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1)
    db.configure(clean_db.url)
    at = draw(start_app(), fixtures_app.digit_png(7))
    with clean_db.connect() as locker:  # e.g. a restore holding the table
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        click(at, app.CORRECT_BUTTON)
        locker.execute("ROLLBACK")
    assert values(at.error) == [app.FEEDBACK_BUSY]
    assert at.warning == []  # no "database unreachable" banner
    assert_nothing_reset(at, label="")
    click(at, app.CORRECT_BUTTON)
    assert values(at.success) and len(stored_rows(clean_db)) == 1


def test_oversized_drawing_and_label_are_refused_and_the_app_goes_on(draw_app, clean_db):
    png = fixtures_app.digit_png(7)
    huge = png + b"\0" * (50 * 2**20)  # a 50 MB canvas message: refused before decoding
    draw(draw_app, huge)
    assert app.DRAWING_TOO_LARGE in values(draw_app.info)
    assert shown_predictions(draw_app) == [] and button(draw_app, app.CORRECT_BUTTON).disabled

    draw(draw_app, png)
    assert len(shown_predictions(draw_app)) == 1
    label_input(draw_app).set_value("7" * 10_000)  # what a forged message could send
    click(draw_app, app.SUBMIT_CORRECTION_BUTTON)
    assert values(draw_app.error) == ["The true label must be one digit from 0 to 9."]
    assert stored_rows(clean_db) == []
    submit_label(draw_app, "7")
    assert [row[1] for row in stored_rows(clean_db)] == [7]


def test_app_threads_sets_the_torch_threads(clean_db, model_file, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("APP_THREADS", "3")
    try:
        draw(start_app(), fixtures_app.digit_png(1))
        seen = []  # as each session's script thread sees it (the main thread keeps its own)
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [3]
    finally:
        torch.set_num_threads(before)


# --- model missing ----------------------------------------------------------------------------


def test_missing_model_shows_how_to_train_one(clean_db, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "missing.pth"))
    at = start_app()
    [error] = values(at.error)
    assert "No model file at" in error and "missing.pth" in error
    assert values(at.code) == [model.TRAIN_COMMAND]
    assert at.button == [] and shown_predictions(at) == []


def test_corrupt_model_shows_how_to_train_one(clean_db, tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    path.write_bytes(b"not a model")
    monkeypatch.setenv("MODEL_PATH", str(path))
    at = start_app()
    [error] = values(at.error)
    assert "corrupt" in error
    assert values(at.code) == [model.TRAIN_COMMAND]


# --- history page -----------------------------------------------------------------------------


def test_history_lists_every_row_newest_first(draw_app, clean_db):
    stored = [(7, 7, 0.986, "a@1"), (3, 8, 0.5, "a@1"), (1, 1, 0.25, None)]
    for predicted, true_label, confidence, name in stored:
        db.log_prediction(predicted, true_label, confidence, model=name)
    assert draw_app.dataframe == []  # the drawing page shows no history

    at = history_app()

    frame = at.dataframe[-1].value
    assert list(frame.columns) == ["time", "predicted", "true label", "confidence", "model"]
    assert list(frame["predicted"]) == [1, 3, 7]
    assert list(frame["true label"]) == [1, 8, 7]
    assert list(frame["confidence"]) == pytest.approx([25.0, 50.0, 98.6], rel=1e-6)
    assert list(frame["model"]) == [app.UNRECORDED_MODEL, "a@1", "a@1"]
    assert frame["time"].is_monotonic_decreasing
    metrics = {metric.label: metric.value for metric in at.metric}
    assert metrics == {"Answers stored": "3", "Model accuracy": "66.7%"}
    # Three answers: counts only where there are some, and no line yet.
    [matrix] = at.get("vega_lite_chart")
    assert chart_data(matrix).values.tolist() == [[1, 1, 1], [7, 7, 1], [8, 3, 1]]
    assert "The line appears with more than 50 answers." in values(at.caption)
    assert at.error == []


def test_history_filters_by_model(clean_db):
    for predicted, true_label, name in [(7, 7, "a@1"), (3, 8, "a@1"), (1, 1, "b@2"), (2, 2, "b@2")]:
        db.log_prediction(predicted, true_label, 0.5, model=name)
    at = history_app()
    assert {metric.label: metric.value for metric in at.metric}["Model accuracy"] == "75.0%"

    at.selectbox(key=app.MODEL_FILTER).select("b@2").run()

    assert {metric.label: metric.value for metric in at.metric} == {
        "Answers stored": "2",
        "Model accuracy": "100.0%",
    }
    [matrix] = at.get("vega_lite_chart")
    assert chart_data(matrix).values.tolist() == [[1, 1, 1], [2, 2, 1]]
    assert list(at.dataframe[-1].value["model"]) == ["b@2", "b@2"]


def test_history_draws_accuracy_per_day_or_per_50_answers(clean_db):
    with clean_db.connect() as conn:  # 60 answers a day ago, 40 today, 90% right
        conn.execute(
            "INSERT INTO predictions (created_at, predicted_digit, true_label, confidence, model)"
            " SELECT now() - (n < 60)::int * interval '1 day', n % 10,"
            " CASE WHEN n % 10 = 0 THEN (n + 1) % 10 ELSE n % 10 END, 0.5, 'a@1'"
            " FROM generate_series(0, 99) AS n"
        )
    at = history_app()
    [_, per_50] = at.get("vega_lite_chart")
    assert chart_data(per_50)[["last_answer", "answers", "correct"]].values.tolist() == [
        [50, 50, 45],
        [100, 50, 45],
    ]
    at.radio(key=app.TIME_SCALE).set_value(app.PER_DAY).run()
    [_, per_day] = at.get("vega_lite_chart")
    assert chart_data(per_day)[["answers", "correct"]].values.tolist() == [[60, 54], [40, 36]]


def test_history_without_rows_says_so(clean_db):
    at = history_app()
    assert values(at.info) == [app.NO_HISTORY]
    assert at.dataframe == []


def test_history_with_the_database_down_shows_an_error(fresh_pg_server):
    db.configure(fresh_pg_server.url)
    db.init_db()
    fresh_pg_server.stop()
    at = history_app()
    assert values(at.error) == [app.HISTORY_UNAVAILABLE]
    assert at.dataframe == []


def test_history_with_a_busy_database_says_busy_not_down(clean_db, monkeypatch):
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1)
    db.configure(clean_db.url)
    db.log_prediction(7, 7, 0.9)
    with clean_db.connect() as locker:  # e.g. a restore holding the table
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        at = history_app()
        locker.execute("ROLLBACK")
    assert values(at.error) == [app.HISTORY_BUSY]
    assert app.database_status().ready  # busy is not an outage


def test_a_malformed_database_url_never_crashes_the_app(model_file):
    db.configure("not a connection string")
    at = start_app()
    assert values(at.warning) == [app.DATABASE_DOWN_BANNER]
    click(draw(at, fixtures_app.digit_png(7)), app.CORRECT_BUTTON)
    assert values(at.error) == [app.FEEDBACK_FAILED]
    assert_nothing_reset(at, label="")
    assert values(history_app().error) == [app.HISTORY_FAILED]
