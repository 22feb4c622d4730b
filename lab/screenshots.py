"""The README's pictures of the real app: ``make screenshots`` (``python -m lab.screenshots``).

It starts a throwaway PostgreSQL (lab.postgres) and the app (``streamlit run app.py``, the shipped
model) and drives headless Chromium with the browser harness (lab.browser, which waits on the
app's script state, never on sleeps), then writes to ``docs/screenshots/``:

- ``draw-desktop.png``: the Draw page after drawing a 7 with the mouse (1280 px wide window);
- ``why-desktop.png``: the same with "Why?" open: what in the 7 made the model decide;
- ``draw-phone.png``: the same after drawing a 4 with a finger on a 390x844 phone (its screen);
- ``history.png``: History over ``ANSWERS`` answers: the first stored through the app (the 7,
  confirmed with Correct), the others by db.py under the same model, three days of fixed data.

Everything drawn and stored is fixed (no randomness, fixed times, UTC, en-US), so the pictures
change only when the app does: rerun it after a UI change and commit the PNGs. They are reduced
to 256 colours to stay small.
"""

from __future__ import annotations

import argparse
import io
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from PIL import Image

import db
from lab import browser
from lab.bench.common import postgres_server

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"
# History draws its accuracy line from 2 groups of ui.history.ANSWERS_PER_POINT (50) on
ANSWERS = 120
FIRST_ANSWER_AT = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
BETWEEN_ANSWERS = timedelta(minutes=37)  # 120 answers over 3 days: the per-day view has points
# What a model confuses a digit with, when it is wrong (digits people write alike).
CONFUSED_WITH = {0: 6, 1: 7, 2: 7, 3: 5, 4: 9, 5: 3, 6: 5, 7: 1, 8: 3, 9: 4}
BROWSER = {"timezone_id": "UTC", "locale": "en-US"}  # what the History table's times look like
PHONE_WIDTH_PX = 780  # the phone's picture at 2 device pixels per CSS pixel (its screen has 3)


# The height of the app's content: Streamlit scrolls it inside its main section, not the page.
_CONTENT_HEIGHT = """() => Math.max(...[...document.querySelectorAll(
  '[data-testid="stMain"], [data-testid="stAppViewContainer"]')].map((e) => e.scrollHeight))"""


def save(page: browser.AppPage, path: Path, fit: bool = True, width: int | None = None) -> None:
    """A screenshot of *page* (*fit*: the window made as tall as the content, no more), scaled
    to *width* pixels, in 256 colours."""
    page.page.mouse.move(0, 0)  # no hover highlight on the last button clicked
    viewport = page.page.viewport_size
    if fit:  # measured in a short window: the content fills the window at least
        page.page.set_viewport_size({"width": viewport["width"], "height": 400})
        height = page.page.evaluate(_CONTENT_HEIGHT)
        page.page.set_viewport_size({"width": viewport["width"], "height": height})
    png = page.page.screenshot(animations="disabled", caret="hide")
    page.page.set_viewport_size(viewport)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if width is not None and image.width != width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image = image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, optimize=True)
    print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {image.size}")


def store_answers(url: str) -> None:
    """Add fixed answers after the app's own first one (same model), then set every answer's
    time: one every BETWEEN_ANSWERS from FIRST_ANSWER_AT, in the order they were stored."""
    with psycopg.connect(url, autocommit=True) as conn:
        (model,) = conn.execute("SELECT model FROM predictions ORDER BY id LIMIT 1").fetchone()
        stored = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
    rng = random.Random(23)
    for n in range(stored, ANSWERS):
        true_label = rng.randrange(10)
        right = rng.random() < 0.85 + 0.1 * n / ANSWERS  # right 85% of the time, then 95%
        predicted = true_label if right else CONFUSED_WITH[true_label]
        confidence = rng.uniform(0.9, 1.0) if right else rng.uniform(0.45, 0.85)
        db.log_prediction(predicted, true_label, round(confidence, 4), model=model)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE predictions SET created_at = %s + %s * (numbered.n - 1)"
            " FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM predictions) AS numbered"
            " WHERE predictions.id = numbered.id",
            (FIRST_ANSWER_AT, BETWEEN_ANSWERS),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the PNGs (%(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        postgres_server(durable=False) as server,
        browser.AppProcess(server.url) as app,
        browser.chromium() as chromium,
    ):
        db.configure(server.url)
        with browser.AppPage.open(chromium, app.url, **BROWSER) as desktop:
            desktop.draw_digit(7)
            desktop.wait_for_prediction()
            save(desktop, args.out / "draw-desktop.png")
            desktop.toggle_why()
            save(desktop, args.out / "why-desktop.png")
            desktop.toggle_why()
            desktop.click_correct()  # the first answer, stored by the app itself
            store_answers(server.url)
            desktop.open_history()
            save(desktop, args.out / "history.png")
        phone = browser.PHONES["390x844"]
        with browser.AppPage.open(chromium, app.url, **phone, **BROWSER) as page:
            page.touch_draw(browser.DIGIT_STROKES[4])
            page.wait_for_prediction()
            save(page, args.out / "draw-phone.png", fit=False, width=PHONE_WIDTH_PX)
        db.close_pool()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
