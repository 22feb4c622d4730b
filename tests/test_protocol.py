"""lab/protocol.py, the capacity bench's sessions without a browser, against a real app and a
real PostgreSQL: they must be read and stored as a browser's drawings are, or the bench's load
is not the app's real work."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

from conftest import own_server

from lab import protocol
from lab.browser import ONE_STROKE, AppProcess


def test_protocol_sessions_are_predicted_and_stored_like_a_browsers(
    pg_template: Path, pg_base_dir: Path
):
    async def drive(url: str) -> list[str]:
        sessions = [await protocol.Session(url).open() for _ in range(3)]
        try:
            for strokes in (ONE_STROKE[7], ONE_STROKE[1]):
                latencies = await protocol.draw_all(sessions, strokes)
                assert all(0 < seconds < 60 for seconds in latencies)
                shown = [session.prediction for session in sessions]
                assert all(session.media for session in sessions)  # the model's view, fetched
                await protocol.correct_all(sessions)  # each checks that its canvas was cleared
        finally:
            for session in sessions:
                await session.close()
        return shown

    with own_server(pg_base_dir, pg_template) as server, AppProcess(server.url) as app:
        # A thread of its own: Playwright's sync API (other tests' browser) keeps an event loop
        # running in this one, where asyncio.run refuses to start.
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            last_shown = thread.submit(asyncio.run, drive(app.url)).result()
        with server.connect() as conn:
            rows = conn.execute(
                "SELECT predicted_digit, true_label FROM predictions ORDER BY id"
            ).fetchall()
    assert last_shown == ["Prediction: 1"] * 3
    assert rows == [(7, 7)] * 3 + [(1, 1)] * 3
