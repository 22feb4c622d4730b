"""The History page with 100,000 stored answers: its queries, and the page in a browser."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

from lab.bench.common import Row, at_most, percentile, postgres_server

SECTION = "History"
ROWS = 100_000
RUNS = 5
MODELS = (None, "model.pth@aaaaaaaaaaaa", "model.pth@bbbbbbbbbbbb")  # None: not recorded
# True once both Vega-Lite charts (confusion matrix, accuracy over time: SVG, or a canvas when
# there are many marks) and both tables (per digit, newest answers) are drawn.
_DRAWN = """() =>
  document.querySelectorAll('[data-testid="stVegaLiteChart"] .marks').length >= 2 &&
  document.querySelectorAll('[data-testid="data-grid-canvas"]').length >= 2"""


def fill(server, rows: int = ROWS) -> None:
    """*rows* answers a minute apart, a third per model in turn, right nine times in ten."""
    rng = random.Random(16)
    start = datetime.now(UTC) - timedelta(minutes=rows)
    columns = "created_at, predicted_digit, true_label, confidence, model"
    with (
        server.connect() as conn,
        conn.cursor().copy(f"COPY predictions ({columns}) FROM STDIN") as copy,
    ):
        for n in range(rows):
            true_label = rng.randrange(10)
            predicted = true_label if rng.random() < 0.9 else rng.randrange(10)
            model = MODELS[n * len(MODELS) // rows]
            copy.write_row(
                (start + timedelta(minutes=n), predicted, true_label, rng.random(), model)
            )
    with server.connect() as conn:  # statistics, as autovacuum gathers them on a real table
        conn.execute("VACUUM ANALYZE predictions")


def query_seconds() -> float:
    """The queries the History page makes for all models, run once in this process."""
    import db
    import ui.history

    start = time.perf_counter()
    db.models_answering()
    db.digit_accuracy()
    db.confusion_counts()
    db.most_confused()
    db.accuracy_per_answers(size=ui.history.ANSWERS_PER_POINT)
    db.recent_predictions(limit=ui.history.HISTORY_LIMIT)
    return time.perf_counter() - start


def page_seconds(browser, app_url: str, runs: int = RUNS) -> list[float]:
    """Seconds from a click on History (in a session on the Draw page) until its charts and
    tables are drawn, *runs* times."""
    from lab.browser import AppPage

    seconds = []
    with AppPage.open(browser, app_url) as page:
        for _ in range(runs):
            start = time.perf_counter()
            page.open_history()
            page.page.wait_for_function(_DRAWN, polling=20)
            seconds.append(time.perf_counter() - start)
            page.open_draw()
    return seconds


def run() -> list[Row]:
    import db
    from lab.browser import AppPage, AppProcess, chromium

    with postgres_server(durable=False) as server:
        db.configure(server.url)
        try:
            db.init_db()
            fill(server)
            query_seconds()  # warm-up: the server's caches
            queries = sorted(query_seconds() for _ in range(RUNS))
        finally:
            db.configure(None)
        with AppProcess(server.url) as app, chromium() as browser:
            AppPage.open(browser, app.url).close()  # warm-up: torch import, model load
            pages = page_seconds(browser, app.url)
    where = f"{ROWS:,} rows, {len(MODELS)} models (one not recorded), all models shown"
    return [
        Row(SECTION, f"queries of the page, p50 of {RUNS}", percentile(queries, 50) * 1000, "ms",
            note=f"{where}; models, per digit, matrix, confusions, per 50 answers, newest 1,000"),
        at_most(SECTION, f"click on History to charts and tables drawn, p50 of {RUNS}",
                percentile(pages, 50), "s", 2,
                note=f"{where}; headless Chromium on the same machine; "
                f"all: {', '.join(f'{s:.2f}' for s in pages)} s"),
    ]  # fmt: skip
