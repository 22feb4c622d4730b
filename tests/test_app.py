"""The Streamlit app (app.py and its pages, ui/) in Streamlit's AppTest, against real PostgreSQL.

A drawing reaches the app as a browser sends it: the canvas component's value (a PNG data URL)
set in session_state under the canvas key, then a rerun.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import streamlit as st
import torch
from conftest import ROOT, wait_for
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

import db
import explain
import feedback
import model
import registry.live
import ui.analysis
import ui.draw
import ui.history
import ui.serving
import ui.session
import utils
from lab.browser import fabric_path
from lab.postgres import PostgresProcess
from registry import store

NO_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/postgres"
# Strokes (polylines in canvas pixels) that read as the digit to a person.
STROKES = {
    1: [[(140, 40), (140, 240)]],
    4: [[(170, 240), (170, 40), (70, 170), (210, 170)]],
    7: [[(70, 50), (210, 50), (120, 240)]],
}


# --- drawings, model files, the app ------------------------------------------------------------


# The strokes of each PNG drawing_png made: draw() sends them as the canvas's fabric.js paths.
STROKES_OF_PNG: dict[bytes, list[list[tuple[int, int]]]] = {}


def drawing_png(strokes: list[list[tuple[int, int]]], size: int = utils.CANVAS_SIZE) -> bytes:
    """A PNG like the canvas sends: opaque RGBA, white ink on black."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    pen = ImageDraw.Draw(image)
    for line in strokes:
        pen.line(line, fill=(255, 255, 255, 255), width=utils.BRUSH_WIDTH, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    STROKES_OF_PNG[buffer.getvalue()] = strokes
    return buffer.getvalue()


def digit_png(digit: int) -> bytes:
    return drawing_png(STROKES[digit])


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims *width* x *height* pixels (its data is one pixel's)."""
    data = bytearray(drawing_png([], size=1))
    header = struct.pack(">II", width, height) + bytes(data[24:29])  # IHDR: size, then flags
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def save_untrained_model(path: Path, seed: int = 0, trajectory: bool = True) -> Path:
    """A valid, untrained model file (what train.py writes: a DigitCNN state_dict, with a
    model of the strokes unless told otherwise: what the app reads strokes with)."""
    torch.manual_seed(seed)
    torch.save(model.DigitCNN(trajectory=trajectory).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_untrained_model(tmp_path_factory.mktemp("model") / "model.pth")


@pytest.fixture(autouse=True)
def isolated_app(monkeypatch: pytest.MonkeyPatch, model_file: Path):
    """Fresh process-wide caches; a test that forgets to point db at a server sees it down
    (instead of starting the embedded PostgreSQL in data/postgres)."""
    monkeypatch.setenv("DATABASE_URL", NO_DATABASE_URL)
    monkeypatch.setenv("MODEL_PATH", str(model_file))
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


def start_app() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    assert not at.exception
    return at


@pytest.fixture
def draw_app(clean_db: PostgresProcess) -> AppTest:
    return start_app()


def history_app() -> AppTest:
    """The app opened, then its History page (as a person gets there: from the Draw page; AppTest
    finds a page registered by st.navigation after the first run)."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    at.switch_page("ui/history.py").run()
    assert not at.exception
    return at


def draw(at: AppTest, png: bytes, drawn: bool = True) -> AppTest:
    """What the canvas sends when someone draws (drawn=False: after its clear button): the PNG
    and, for a drawing_png, its strokes as fabric.js paths."""
    # AppTest has no element for a custom component (it reads as an UnknownElement, which
    # cannot be set): its value is set in session_state under its key, as the browser sends it.
    objects = [fabric_path(stroke) for stroke in strokes_of(png)] if drawn else []
    data_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    value = {"drawing": {"raw": {"objects": objects}, "data": data_url}, "backgroundFit": None}
    at.session_state[f"canvas-{at.session_state[ui.session.CANVAS_GENERATION]}"] = value
    at.run()
    assert not at.exception
    return at


def strokes_of(png: bytes) -> list[list[tuple[int, int]]]:
    """The strokes draw() sends with a PNG: drawing_png's, else a dot."""
    return STROKES_OF_PNG.get(png) or [[(0, 0)]]


def widget_key(at: AppTest, name: str) -> str:
    """The key of a feedback widget for the drawing on screen (ui.session.feedback_key)."""
    key = ui.session.ANALYSIS
    analysis = at.session_state[key] if key in at.session_state else None  # noqa: SIM401 (no .get)
    return ui.session.feedback_key(name, analysis)


def button(at: AppTest, name: str):
    return at.button(key=widget_key(at, name))


def label_input(at: AppTest):
    return at.text_input(key=widget_key(at, ui.session.TRUE_LABEL_INPUT))


def click(at: AppTest, name: str) -> AppTest:
    button(at, name).click().run()
    assert not at.exception
    return at


def submit_label(at: AppTest, text: str) -> AppTest:
    label_input(at).set_value(text)
    return click(at, ui.session.SUBMIT_CORRECTION_BUTTON)


def values(elements) -> list[str]:
    return [element.value for element in elements]


def shown_predictions(at: AppTest) -> list[str]:
    return [text for text in values(at.subheader) if text.startswith("Prediction:")]


def shown_bars(at: AppTest) -> list[str]:
    """The probabilities' bar charts on the page (st.html elements; the page's CSS is another)."""
    return [html.value for html in at.html if 'aria-label="Probabilities' in html.value]


def chart_data(chart):
    """The data of a Vega-Lite chart (one data set), as a pandas DataFrame. AppTest has no chart
    element: a chart reads as an UnknownElement, whose value is None; its data sets are in the
    element's message only, as Arrow IPC streams (read with pyarrow's public reader)."""
    (dataset,) = chart.proto.datasets
    return pa.ipc.open_stream(dataset.data.data).read_pandas()


def expected_prediction(model_path: Path, png: bytes, strokes: bool = True) -> model.Prediction:
    """What the model makes of a drawing draw() sends: its image and its strokes (`strokes`
    False: the image alone)."""
    image = np.asarray(Image.open(io.BytesIO(png)))
    trajectory = utils.trajectory(strokes_of(png)) if strokes else None
    return model.predict(model.load_model(model_path), utils.preprocess(image), trajectory)


def stored_rows(server: PostgresProcess) -> list[tuple]:
    with server.connect() as conn:
        return conn.execute(
            "SELECT predicted_digit, true_label, confidence, submission_id"
            " FROM predictions ORDER BY id"
        ).fetchall()


def assert_nothing_reset(at: AppTest, label: str) -> None:
    assert at.session_state[ui.session.CANVAS_GENERATION] == 0
    assert label_input(at).value == label
    assert len(shown_predictions(at)) == 1


def assert_reset(at: AppTest) -> None:
    assert at.session_state[ui.session.CANVAS_GENERATION] == 1
    assert label_input(at).value == ""
    assert shown_predictions(at) == []
    assert ui.draw.NOTHING_DRAWN in values(at.info)
    assert ui.session.PENDING_SUBMISSION not in at.session_state
    assert button(at, ui.session.CORRECT_BUTTON).disabled


def assert_no_feedback(at: AppTest) -> None:
    assert shown_predictions(at) == [] and shown_bars(at) == []
    assert button(at, ui.session.CORRECT_BUTTON).disabled and label_input(at).disabled
    assert button(at, ui.session.SUBMIT_CORRECTION_BUTTON).disabled


# --- draw page: prediction --------------------------------------------------------------------


def test_without_a_readable_digit_the_app_gives_a_hint_and_no_feedback(draw_app):
    assert values(draw_app.info) == [ui.draw.NOTHING_DRAWN]
    assert_no_feedback(draw_app)
    unreadable = "could not be read"
    for png, hint in [
        (drawing_png([]), "Nothing is drawn yet"),  # ink drawn, then undone
        (drawing_png([[(140, 140), (141, 141)]]), "only a dot"),
        (b"not a png", unreadable),
        (digit_png(7)[:100], unreadable),  # truncated
        (png_header(20_000, 20_000), unreadable),  # over Pillow's decompression-bomb limit
        # far too large
        (drawing_png(STROKES[7], size=ui.analysis.MAX_DRAWING_SIDE + 1), unreadable),
        # refused before decoding
        (b"\0" * ui.session.MAX_DRAWING_URL_CHARS, ui.session.DRAWING_TOO_LARGE),
    ]:
        draw(draw_app, png)
        assert [text for text in values(draw_app.info) if hint in text], hint
        assert_no_feedback(draw_app)

    draw(draw_app, digit_png(7))
    assert len(shown_predictions(draw_app)) == 1
    draw(draw_app, drawing_png([]), drawn=False)  # the canvas's clear button
    assert values(draw_app.info) == [ui.draw.NOTHING_DRAWN]
    assert_no_feedback(draw_app)


def test_a_drawing_shows_prediction_confidence_probabilities_and_model_view(draw_app, model_file):
    png = digit_png(7)
    expected = expected_prediction(model_file, png)

    draw(draw_app, png)

    assert shown_predictions(draw_app) == [f"Prediction: {expected.digit}"]
    assert f"**Confidence: {expected.confidence:.1%}**" in values(draw_app.markdown)
    (bars,) = shown_bars(draw_app)
    shown = re.findall(r'title="(\d): ([\d.]+)%".*?height:([\d.]+)px', bars)
    assert [int(digit) for digit, _, _ in shown] == list(range(10))
    percents = [float(percent) / 100 for _, percent, _ in shown]
    assert percents == pytest.approx(expected.probabilities, abs=0.0005)
    heights = [float(height) / ui.draw.BAR_MAX_PX for _, _, height in shown]
    assert heights == pytest.approx(expected.probabilities, abs=0.001)
    [(url,)] = [image.value for image in draw_app.image]
    assert url.endswith(".png")  # lossless, so the pixels stay crisp
    assert not button(draw_app, ui.session.CORRECT_BUTTON).disabled
    assert not label_input(draw_app).disabled


def test_the_runner_up_is_named_with_its_probability_as_the_bars_show_it(draw_app, model_file):
    png = digit_png(7)
    expected = expected_prediction(model_file, png)
    second = sorted(range(10), key=lambda digit: -expected.probabilities[digit])[1]
    assert expected.probabilities[second] >= ui.draw.SHOWN_SHARE  # an untrained model hesitates

    draw(draw_app, png)

    (bars,) = shown_bars(draw_app)
    (percent,) = re.findall(rf'title="{second}: ([\d.]+%)"', bars)
    assert f"or a {second} ({percent})" in values(draw_app.markdown)


def test_a_runner_up_under_its_shown_share_is_not_named():
    sure = model.Prediction(7, 0.96, (0.0,) * 3 + (0.04,) + (0.0,) * 3 + (0.96, 0.0, 0.0))
    hesitant = model.Prediction(7, 0.9, (0.0,) * 3 + (0.1,) + (0.0,) * 3 + (0.9, 0.0, 0.0))
    assert ui.draw.runner_up_line(sure) is None
    assert ui.draw.runner_up_line(hesitant) == "or a 3 (10.0%)"


def test_why_is_computed_only_when_opened_once_per_drawing_and_shows_the_maps(
    draw_app, monkeypatch
):
    explained = []
    real = explain.explain
    monkeypatch.setattr(explain, "explain", lambda *a, **k: explained.append(a) or real(*a, **k))
    captions = lambda at: [c for image in at.image for c in image.captions]  # noqa: E731

    draw(draw_app, digit_png(7))
    assert not draw_app.toggle(key=ui.session.WHY_TOGGLE).value  # closed by default
    assert explained == [] and ui.session.EXPLANATION not in draw_app.session_state

    draw_app.toggle(key=ui.session.WHY_TOGGLE).set_value(True).run()
    assert not draw_app.exception
    assert len(explained) == 1
    assert {"Both models", "The image", "The strokes"} <= set(captions(draw_app))
    draw_app.run()  # a rerun with the same drawing: no new explanation
    draw(draw_app, digit_png(7))  # the canvas sends the same drawing again
    assert len(explained) == 1
    draw(draw_app, digit_png(4))  # a new drawing, "Why?" still open
    assert len(explained) == 2 and "Both models" in captions(draw_app)


def test_the_strokes_are_read_with_the_image_and_unreadable_strokes_leave_the_image_alone(
    draw_app, model_file, caplog
):
    """The canvas's fabric.js paths reach the model of the strokes in the same call as the image
    (the answer is both models'); where they cannot be read, the image alone is read, as
    before."""
    png = digit_png(4)
    both, alone = (expected_prediction(model_file, png, strokes) for strokes in (True, False))
    assert both.probabilities != pytest.approx(alone.probabilities, abs=1e-4)
    draw(draw_app, png)
    shown = draw_app.session_state[ui.session.ANALYSIS].prediction
    assert shown.probabilities == pytest.approx(both.probabilities, abs=1e-6)

    png = digit_png(7)
    with caplog.at_level(logging.WARNING, logger="app"):
        value = {"drawing": {"raw": {"objects": [{"type": "Path", "path": [["Z", "?"]]}]}}}
        value["drawing"]["data"] = "data:image/png;base64," + base64.b64encode(png).decode()
        canvas = f"canvas-{draw_app.session_state[ui.session.CANVAS_GENERATION]}"
        draw_app.session_state[canvas] = value  # as draw() sends a drawing
        draw_app.run()
    analysis = draw_app.session_state[ui.session.ANALYSIS]
    alone = expected_prediction(model_file, png, strokes=False)
    assert analysis.prediction.probabilities == pytest.approx(alone.probabilities, abs=1e-6)
    assert shown_predictions(draw_app) == [f"Prediction: {alone.digit}"]
    assert "strokes unreadable, predicting from the image alone" in caplog.text


def test_model_view_is_the_28x28_input_upscaled_with_nearest_neighbour():
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[3, 5] = 200
    view = np.asarray(Image.open(io.BytesIO(ui.analysis.model_view_png(pixels))))
    assert view.shape == (ui.analysis.MODEL_VIEW_SIZE, ui.analysis.MODEL_VIEW_SIZE)
    assert set(np.unique(view)) == {0, 200}  # no blur
    assert (view[15:20, 25:30] == 200).all() and view[15:20, 24].max() == 0


def test_an_unchanged_drawing_is_predicted_once_and_the_model_loaded_once(clean_db, caplog):
    caplog.set_level(logging.INFO, logger="app")

    def logged(start: str) -> int:
        return sum(r.name == "app" and r.message.startswith(start) for r in caplog.records)

    at = draw(start_app(), digit_png(7))
    at.run()
    draw(at, digit_png(7))  # the canvas sends the same image again
    assert logged("predicted") == 1
    draw(at, digit_png(1))
    draw(start_app(), digit_png(4))  # a second browser session
    assert logged("predicted") == 3
    assert logged("loaded model") == 1


def test_app_threads_sets_the_torch_threads(clean_db, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("APP_THREADS", "3")
    try:
        draw(start_app(), digit_png(1))
        seen = []  # as each session's script thread sees it (the main thread keeps its own)
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [3]
    finally:
        torch.set_num_threads(before)


def test_missing_model_shows_how_to_train_one(clean_db, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "missing.pth"))
    at = start_app()
    [error] = values(at.error)
    assert "No model file at" in error and "missing.pth" in error
    assert values(at.code) == [model.TRAIN_COMMAND]
    assert at.button == [] and shown_predictions(at) == []


# --- draw page: feedback ----------------------------------------------------------------------


def test_a_retry_of_the_same_answer_keeps_its_submission_id():
    first = feedback.submission_for(None, "drawing-a", 7, 0.9, true_label=7)
    assert feedback.submission_for(first, "drawing-a", 7, 0.9, true_label=7) is first
    other_label = feedback.submission_for(first, "drawing-a", 7, 0.9, true_label=1)
    other_drawing = feedback.submission_for(first, "drawing-b", 7, 0.9, true_label=7)
    ids = {first.submission_id, other_label.submission_id, other_drawing.submission_id}
    assert len(ids) == 3


def test_correct_stores_the_predicted_digit_with_the_model_confidence(
    draw_app, clean_db, model_file
):
    png = digit_png(7)
    expected = expected_prediction(model_file, png)

    click(draw(draw_app, png), ui.session.CORRECT_BUTTON)

    [(predicted, true_label, confidence, _)] = stored_rows(clean_db)
    assert (predicted, true_label) == (expected.digit, expected.digit)
    assert confidence == pytest.approx(expected.confidence, rel=1e-6)
    assert values(draw_app.success) == [
        f"Saved: you drew a {expected.digit} "
        f"(model said {expected.digit}, {expected.confidence:.1%})."
    ]
    assert_reset(draw_app)


def test_a_typed_label_is_stored_only_when_it_is_one_digit(draw_app, clean_db, model_file):
    png = digit_png(4)
    expected = expected_prediction(model_file, png)
    submit_label(draw(draw_app, png), "12")
    [error] = values(draw_app.error)
    assert "one digit from 0 to 9" in error
    assert stored_rows(clean_db) == [] and draw_app.success == []
    assert_nothing_reset(draw_app, label="12")

    true_label = (expected.digit + 1) % 10
    submit_label(draw_app, f" {true_label} ")

    [(predicted, stored_label, confidence, _)] = stored_rows(clean_db)
    assert (predicted, stored_label) == (expected.digit, true_label)
    assert confidence == pytest.approx(expected.confidence, rel=1e-6)
    assert values(draw_app.success) == [
        f"Saved: you drew a {true_label} (model said {expected.digit}, {expected.confidence:.1%})."
    ]
    assert draw_app.error == []
    assert_reset(draw_app)


def test_a_new_drawing_clears_the_previous_error(draw_app):
    submit_label(draw(draw_app, digit_png(7)), "x")
    assert draw_app.error
    draw(draw_app, digit_png(1))
    assert draw_app.error == []


def test_an_answer_records_the_model_that_made_the_prediction(
    draw_app, clean_db, tmp_path, monkeypatch
):
    path = save_untrained_model(tmp_path / "model.pth")
    monkeypatch.setenv("MODEL_PATH", str(path))

    def name_of_the_file() -> str:
        return f"model.pth@{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"

    first = name_of_the_file()
    click(draw(draw_app, digit_png(7)), ui.session.CORRECT_BUTTON)
    save_untrained_model(path, seed=1)  # retrained while the app runs
    click(draw(draw_app, digit_png(1)), ui.session.CORRECT_BUTTON)

    with clean_db.connect() as conn:
        names = [row[0] for row in conn.execute("SELECT model FROM predictions ORDER BY id")]
    assert names == [first, name_of_the_file()]
    assert first != names[1]


def stored_drawings(server: PostgresProcess) -> list[tuple]:
    with server.connect() as conn:
        return conn.execute(
            "SELECT p.submission_id, d.strokes, d.canvas_size, d.brush_width, d.image"
            " FROM drawings d JOIN predictions p ON p.id = d.prediction_id ORDER BY p.id"
        ).fetchall()


def test_an_answer_keeps_the_drawing_that_was_shown(draw_app, clean_db, model_file):
    """The strokes as the canvas sent them, the canvas and brush sizes, and the 28x28 image
    shown as "What the model sees"; the page says that drawings are kept."""
    assert ui.draw.DRAWINGS_KEPT in values(draw_app.caption)
    png = digit_png(7)
    draw(draw_app, png)
    shown = draw_app.session_state[ui.session.ANALYSIS]
    view = np.asarray(Image.open(io.BytesIO(shown.model_view_png)))
    click(draw_app, ui.session.CORRECT_BUTTON)

    [(submission_id, strokes, canvas_size, brush_width, image)] = stored_drawings(clean_db)
    assert [row[3] for row in stored_rows(clean_db)] == [submission_id]
    assert strokes == [[list(point) for point in stroke] for stroke in STROKES[7]]
    assert (canvas_size, brush_width) == (utils.CANVAS_SIZE, utils.BRUSH_WIDTH)
    step = ui.analysis.MODEL_VIEW_SIZE // utils.FRAME_SIZE  # the view is the image, 5x larger
    assert image == view[::step, ::step].tobytes() == shown.model_pixels
    image_read = utils.to_pixels(utils.preprocess(np.asarray(Image.open(io.BytesIO(png)))))
    assert image == image_read.tobytes()


def test_store_drawings_false_stores_the_answer_without_its_drawing(clean_db, monkeypatch):
    monkeypatch.setenv("STORE_DRAWINGS", "false")
    at = start_app()
    assert ui.draw.DRAWINGS_KEPT not in values(at.caption)
    click(draw(at, digit_png(7)), ui.session.CORRECT_BUTTON)
    assert values(at.success) and len(stored_rows(clean_db)) == 1
    assert stored_drawings(clean_db) == []


def _long_stroke() -> list[list[tuple[float, float]]]:
    (x0, y0), (x1, y1) = STROKES[1][0]
    count = db.MAX_STROKE_POINTS + 1
    return [[(x0 + n % 2, y0 + (y1 - y0) * n / count) for n in range(count)]]


def _many_strokes() -> list[list[tuple[float, float]]]:
    return [[(20 + 2 * n, 100), (20 + 2 * n, 180)] for n in range(db.MAX_STROKES + 1)]


@pytest.mark.parametrize(
    ("strokes", "reason"),
    [(_long_stroke, "(a stroke of 2001 "), (_many_strokes, "(101 strokes, ")],
    ids=["stroke-points", "strokes"],
)
def test_a_drawing_too_large_to_keep_is_refused_and_nothing_is_stored(
    draw_app, clean_db, strokes, reason
):
    """Over a documented limit (db.MAX_STROKE_POINTS, checked when the answer is saved;
    db.MAX_STROKES, when the canvas's fabric.js paths are read): a clear message, no row,
    nothing reset; with a drawing of fewer points, the answer is stored."""
    draw(draw_app, drawing_png(strokes()))
    click(draw_app, ui.session.CORRECT_BUTTON)
    [error] = values(draw_app.error)
    assert error.startswith("Not saved: this drawing is too large to keep " + reason)
    assert stored_rows(clean_db) == [] and stored_drawings(clean_db) == []
    assert_nothing_reset(draw_app, label="")
    click(draw(draw_app, digit_png(1)), ui.session.CORRECT_BUTTON)
    assert len(stored_rows(clean_db)) == len(stored_drawings(clean_db)) == 1


def test_database_down_keeps_the_drawing_and_label_and_the_retry_stores_once(fresh_pg_server):
    fresh_pg_server.stop()
    db.configure(fresh_pg_server.url)
    at = start_app()
    assert values(at.warning) == [ui.draw.DATABASE_DOWN_BANNER]
    draw(at, digit_png(7))  # predictions work without a database
    assert len(shown_predictions(at)) == 1

    submit_label(at, "3")
    assert values(at.error) == [ui.session.FEEDBACK_NOT_SAVED]
    assert_nothing_reset(at, label="3")
    pending = at.session_state[ui.session.PENDING_SUBMISSION].submission_id
    click(at, ui.session.SUBMIT_CORRECTION_BUTTON)  # still down
    assert values(at.error) == [ui.session.FEEDBACK_NOT_SAVED]

    fresh_pg_server.start()  # empty: the table does not exist yet
    click(at, ui.session.SUBMIT_CORRECTION_BUTTON)
    assert values(at.success)[0].startswith("Saved: you drew a 3 ")
    assert at.error == [] and at.warning == []
    # The id of the first attempt: had it reached the database, this would be the same row.
    assert [(row[1], row[3]) for row in stored_rows(fresh_pg_server)] == [(3, pending)]
    assert_reset(at)


def test_a_busy_database_keeps_the_answer_and_says_busy_not_down(clean_db, monkeypatch):
    monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1)
    db.configure(clean_db.url)
    at = draw(start_app(), digit_png(7))
    with clean_db.connect() as locker:  # e.g. a restore holding the table
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        click(at, ui.session.CORRECT_BUTTON)
        history = history_app()
        locker.execute("ROLLBACK")
    assert values(at.error) == [ui.session.FEEDBACK_BUSY]
    assert values(history.error) == [ui.history.HISTORY_BUSY]
    assert at.warning == []  # no "database unreachable" banner
    assert_nothing_reset(at, label="")
    click(at, ui.session.CORRECT_BUTTON)
    assert values(at.success) and len(stored_rows(clean_db)) == 1


def test_a_malformed_database_url_never_crashes_the_app():
    db.configure("not a connection string")
    at = start_app()
    assert values(at.warning) == [ui.draw.DATABASE_DOWN_BANNER]
    click(draw(at, digit_png(7)), ui.session.CORRECT_BUTTON)
    assert values(at.error) == [ui.session.FEEDBACK_FAILED]
    assert_nothing_reset(at, label="")
    assert values(history_app().error) == [ui.history.HISTORY_FAILED]


def test_more_replicas_than_the_databases_connections_allow_store_nothing_and_say_why(
    clean_db, monkeypatch, caplog
):
    monkeypatch.setenv("APP_REPLICAS", "1000")  # deploy/stack.yml passes its replica count
    db.configure(clean_db.url)
    at = start_app()
    assert "1000 app replicas (APP_REPLICAS)" in caplog.text
    assert "but PostgreSQL allows only" in caplog.text
    click(draw(at, digit_png(7)), ui.session.CORRECT_BUTTON)
    assert values(at.error) == [ui.session.FEEDBACK_FAILED]
    assert stored_rows(clean_db) == []


# --- draw page: a candidate in shadow ---------------------------------------------------------


def versions(server: PostgresProcess, live: Path, *candidates: Path) -> list[str]:
    """*live* the live version and each of *candidates* a version; the app pointed at *server*.
    Their names (predictions.model)."""
    with server.connect() as conn:
        shas = [store.ensure_live(conn, live)]
        shas += [store.register(conn, path.read_bytes(), {}) for path in candidates]
    db.configure(server.url)
    return [store.version_name(sha) for sha in shas]


def visible(at: AppTest) -> list:
    """Everything a person reads on the page, in order, but the pictures (their URLs change)."""
    return [
        (element.type, getattr(element, "value", None) or getattr(element, "label", None))
        for element in at.main
        if element.type not in ("imgs", "image")
    ]


def shadow_rows(server: PostgresProcess) -> list[tuple]:
    with server.connect() as conn:
        return conn.execute(
            "SELECT model, predicted_digit, confidence, shadow_model, shadow_digit,"
            " shadow_confidence FROM predictions ORDER BY id"
        ).fetchall()


def test_the_shadows_stored_answers_are_the_candidates_own_and_the_page_shows_only_the_live_one(
    server, model_file, tmp_path
):
    """The live model's answer is shown, as without a shadow, and stored; beside it the shadow
    model's own digit and confidence for the same drawing, as the candidate reads it alone."""
    png = digit_png(7)
    candidate = save_untrained_model(tmp_path / "candidate.pth", seed=1)
    shown, read = (expected_prediction(path, png) for path in (model_file, candidate))
    assert shown.probabilities != read.probabilities
    live_name, shadow_name = versions(server, model_file, candidate)
    without_shadow = visible(draw(start_app(), png))
    store.set_shadow(shadow_name.split("@")[1], conninfo=server.url)
    st.cache_resource.clear()  # a new app process: it reads the shadow at once

    at = draw(start_app(), png)
    assert visible(at) == without_shadow
    assert shown_predictions(at) == [f"Prediction: {shown.digit}"]
    click(at, ui.session.CORRECT_BUTTON)

    [(model_name, digit, confidence, *shadow)] = shadow_rows(server)
    assert (model_name, digit) == (live_name, shown.digit)
    assert confidence == pytest.approx(shown.confidence, rel=1e-6)
    assert shadow[:2] == [shadow_name, read.digit]
    assert shadow[2] == pytest.approx(read.confidence, rel=1e-6)


def test_an_answer_stores_the_shadow_that_read_its_drawing_or_none(
    server, model_file, tmp_path, monkeypatch
):
    """A drawing read before a shadow was set is stored without a shadow's answer; one read by a
    shadow that changed before the click, with that shadow's (the one that read it), never the
    new one's."""
    monkeypatch.setattr(registry.live, "MODEL_CHECK_S", 0.2)
    first, second = (save_untrained_model(tmp_path / f"c{n}.pth", seed=n) for n in (1, 2))
    _, first_name, second_name = versions(server, model_file, first, second)
    at = draw(start_app(), digit_png(7))  # read without a shadow
    store.set_shadow(first_name.split("@")[1], conninfo=server.url)
    shadow_of = lambda: (ui.serving.shadow_classifier() or (None, None))[1]  # noqa: E731
    assert wait_for(lambda: shadow_of() == first_name)
    click(at, ui.session.CORRECT_BUTTON)
    draw(at, digit_png(4))  # read by the first shadow
    store.set_shadow(second_name.split("@")[1], conninfo=server.url)
    assert wait_for(lambda: shadow_of() == second_name)
    click(at, ui.session.CORRECT_BUTTON)

    read = expected_prediction(first, digit_png(4))
    stored = [row[3:5] for row in shadow_rows(server)]
    assert stored == [(None, None), (first_name, read.digit)]


# --- history page -----------------------------------------------------------------------------


def test_history_lists_every_row_newest_first(clean_db):
    stored = [(7, 7, 0.986, "a@1"), (3, 8, 0.5, "a@1"), (1, 1, 0.25, None)]
    drawing = db.Drawing([[[140.0, 40.0], [140.0, 240.0]]], 280, 18.0, bytes(784))
    for n, (predicted, true_label, confidence, name) in enumerate(stored):
        # Answers with their drawing and without (stored before drawings were kept, or with
        # STORE_DRAWINGS off) count alike.
        kept = drawing if n == 1 else None
        db.log_prediction(predicted, true_label, confidence, model=name, drawing=kept)

    at = history_app()

    frame = at.dataframe[-1].value
    assert list(frame.columns) == ["time", "predicted", "true label", "confidence", "model"]
    assert list(frame["predicted"]) == [1, 3, 7]
    assert list(frame["true label"]) == [1, 8, 7]
    assert list(frame["confidence"]) == pytest.approx([25.0, 50.0, 98.6], rel=1e-6)
    assert list(frame["model"]) == [ui.history.UNRECORDED_MODEL, "a@1", "a@1"]
    assert frame["time"].is_monotonic_decreasing
    metrics = {metric.label: metric.value for metric in at.metric}
    assert metrics == {"Answers stored": "3", "Model accuracy": "66.7%"}
    # Three answers: counts only where there are some, and no line yet.
    [matrix] = at.get("vega_lite_chart")
    assert chart_data(matrix).values.tolist() == [[1, 1, 1], [7, 7, 1], [8, 3, 1]]
    assert "The line appears with more than 50 answers." in values(at.caption)
    assert ui.history.DRAWINGS_EXPORT in values(at.caption)  # drawings: the owner's export


def test_history_filters_by_model(clean_db):
    for predicted, true_label, name in [(7, 7, "a@1"), (3, 8, "a@1"), (1, 1, "b@2"), (2, 2, "b@2")]:
        db.log_prediction(predicted, true_label, 0.5, model=name)
    at = history_app()
    assert {metric.label: metric.value for metric in at.metric}["Model accuracy"] == "75.0%"

    at.selectbox(key=ui.history.MODEL_FILTER).select("b@2").run()

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
    at.radio(key=ui.history.TIME_SCALE).set_value(ui.history.PER_DAY).run()
    [_, per_day] = at.get("vega_lite_chart")
    assert chart_data(per_day)[["answers", "correct"]].values.tolist() == [[60, 54], [40, 36]]


def test_history_shows_the_learner_s_attempts_with_their_comparison(clean_db):
    db.log_prediction(7, 7, 0.9, model="a@1")
    with clean_db.connect() as conn:
        conn.execute(
            "INSERT INTO learning_attempts (state, answers, new_answers, through_id, candidate,"
            " report, message, finished_at) VALUES ('refused', 250, 210, 250, %s, %s,"
            " 'worse on MNIST test', now())",
            ("ab" * 32, '{"table": "candidate abab against the live model"}'),
        )
        conn.execute(
            "INSERT INTO learning_attempts (answers, new_answers, through_id)"
            " VALUES (480, 230, 480)"
        )

    at = history_app()

    table = next(f.value for f in at.dataframe if "verdict" in f.value.columns)
    assert list(table["verdict"]) == ["running", "refused"]  # newest first
    assert list(table["answers"]) == [480, 250] and list(table["new"]) == [230, 210]
    assert list(table["why"]) == ["", "worse on MNIST test"]
    assert list(table["candidate"]) == ["", "ab" * 6]
    [expander] = at.expander
    assert expander.label == "Attempt 1 (refused): the comparison"
    assert [code.value for code in at.code] == ["candidate abab against the live model"]


def test_history_shows_the_live_model_against_the_shadow_only_once_a_shadow_answered(clean_db):
    title = "Live against the shadow candidate"
    db.log_prediction(7, 7, 0.9, model="a@1")
    assert title not in values(history_app().subheader)
    # (live digit, the shadow's, true label): both right, only the shadow, only the live model.
    for live, shadow, label in [(7, 7, 7), (1, 7, 7), (3, 5, 3)]:
        db.log_prediction(
            live, label, 0.9, model="a@1", shadow_model="b@2", shadow_digit=shadow,
            shadow_confidence=0.5,
        )  # fmt: skip
    at = history_app()
    assert title in values(at.subheader)
    [table] = [frame.value for frame in at.dataframe if "shadow candidate" in frame.value]
    assert table.to_dict("records") == [
        {
            "live model": "a@1",
            "shadow candidate": "b@2",
            "drawings": 3,
            "live right": 2,
            "candidate right": 2,
            "only the live model right": 1,
            "only the candidate right": 1,
        }
    ]


def test_history_without_rows_says_so(clean_db):
    at = history_app()
    assert values(at.info) == [ui.history.NO_HISTORY]
    assert at.dataframe == []


def test_history_with_the_database_down_says_so():
    db.configure(NO_DATABASE_URL)
    at = history_app()
    assert values(at.error) == [ui.history.HISTORY_UNAVAILABLE]
    assert at.dataframe == []
