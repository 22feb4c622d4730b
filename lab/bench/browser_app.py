"""The app in a browser: cold start of ``streamlit run``, and stroke-to-prediction latency and the
app's CPU per drawing with 1, 8 and 16 sessions drawing at once."""

from __future__ import annotations

import time

from lab.bench.common import Row, at_most, percentile, postgres_server

SECTION = "App"
COLD_STARTS = 3
DRAWINGS = 20
LOADS = ((1, DRAWINGS), (8, 5), (16, 5))  # (sessions, digits each)


def cold_start(browser, database_url: str) -> tuple[float, float]:
    """Seconds from spawning ``streamlit run app.py`` to a healthy /_stcore/health, and to
    the first prediction shown in the (already running) browser."""
    from lab.browser import ONE_STROKE, AppPage, AppProcess

    app = AppProcess(database_url)
    start = time.perf_counter()
    try:
        app.start()
        healthy = time.perf_counter() - start
        with AppPage.open(browser, app.url) as page:
            page.draw(ONE_STROKE[7])
            page.wait_for_prediction()
            shown = time.perf_counter() - start
    finally:
        app.stop()
    return healthy, shown


def session_latencies(
    browser, database_url: str, sessions: int, digits: int
) -> tuple[list[float], list[float], float]:
    """*sessions* sessions of one app process each draw *digits* one-stroke digits in lockstep,
    each answered with Correct (lab.bench.capacity.drive). Returns the milliseconds from each
    mouse-up to the prediction on screen (the first frame with the "Prediction: N" heading),
    the length of that run as the page saw it (its script state running, then notRunning), and
    the app process's CPU seconds (user + system) per drawing, its Correct included."""
    from lab.bench.capacity import drive
    from lab.browser import AppProcess

    with AppProcess(database_url) as app:
        load = drive(browser, app, sessions, digits)
    return load.latencies_ms, load.runs_ms, load.cpu_s / load.cycles


def run() -> list[Row]:
    from lab.browser import chromium

    with postgres_server(durable=True) as server, chromium() as browser:
        starts = [cold_start(browser, server.url) for _ in range(COLD_STARTS)]
        loads = {
            sessions: session_latencies(browser, server.url, sessions, digits)
            for sessions, digits in LOADS
        }
    healthy = sorted(s[0] for s in starts)
    shown = sorted(s[1] for s in starts)
    all_starts = f"median of {COLD_STARTS} starts (all: {', '.join(f'{s:.1f}' for s in shown)} s)"
    latencies, runs, _ = loads[1]
    rows = [
        Row(
            SECTION,
            "cold start: process start to /_stcore/health OK",
            percentile(healthy, 50),
            "s",
            note=f"streamlit run app.py, given PostgreSQL; median of {COLD_STARTS}; "
            "health polled every 0.1 s",
        ),
        at_most(
            SECTION,
            "cold start: process start to first prediction in a browser",
            percentile(shown, 50),
            "s",
            10,
            note=f"{all_starts}; Chromium already running; includes drawing a one-stroke 7",
        ),
        at_most(
            SECTION,
            f"stroke end (mouse up) to prediction on screen, p50 of {DRAWINGS}",
            percentile(latencies, 50),
            "ms",
            300,
            note="includes the canvas's own 200 ms debounce; headless Chromium on the "
            "same cores; 'on screen': first frame with the Prediction heading",
        ),
        Row(
            SECTION,
            f"stroke end to prediction on screen, p95 of {DRAWINGS}",
            percentile(latencies, 95),
            "ms",
            note=f"max {max(latencies):.0f} ms",
        ),
        Row(
            SECTION,
            "script run of a drawing, as the page sees it, p50",
            percentile(runs, 50),
            "ms",
            note="the app root's data-test-script-state from running to notRunning (the run "
            "goes on after the prediction is shown: chart, image, feedback row)",
        ),
    ]
    for sessions, digits in LOADS:
        latencies, _, cpu = loads[sessions]
        rows += [
            Row(
                SECTION,
                f"{sessions} sessions drawing at once: stroke end to prediction, p50 / p95",
                percentile(latencies, 50),
                "ms",
                note=f"p95 {percentile(latencies, 95):.0f} ms, max {max(latencies):.0f} ms; "
                f"{sessions} x {digits} one-stroke digits, all sent within a few ms, each "
                "answered with Correct; one app process, Chromium on the same cores",
            ),
            Row(
                SECTION,
                f"{sessions} sessions: app CPU per drawing (predict + Correct)",
                cpu * 1000,
                "ms",
                note="user + system CPU of the streamlit process over the "
                "measured drawings, divided by their number",
            ),
        ]
    return rows
