"""Per-core capacity of one app process (issue 21): its CPU per drawing cycle (a drawing, its
prediction, Correct, the answer saved, the canvas cleared) with 1 and 16 sessions, the cycles per
second it sustains on one core, mouse-up to prediction with 16 sessions, and its memory over
1,000 cycles (Streamlit's garbage collection after every run is off: .streamlit/config.toml).

The app runs pinned to CPU 0 (``pinned``: this thread's affinity while it starts the process,
which inherits it, as with ``taskset -c 0``); PostgreSQL runs where it likes.

With 16 sessions, one is a Chromium page and 15 speak Streamlit's protocol without a browser
(lab/protocol.py). People's browsers run on their own devices, not on the app's machine: 16
Chromium pages on the same 2 cores cost ~1 s of CPU each per drawing cycle (the app: ~45 ms), and
their rendering, not the app, set the latency measured that way (docs/benchmarks.md, "Per-core
capacity"). The page's mouse-up to its prediction on screen is the figure a person sees; the
protocol sessions send their drawings the canvas's 200 ms debounce after that mouse-up, so the app
gets all 16 at once.

The memory run drives the app with Streamlit's AppTest in a process of its own
(``python -m lab.bench.capacity CYCLES DATABASE_URL``): the same script, session state, caches,
model and database as a browser session, without the web server, the WebSocket and the browser,
which at ~0.5 cycles/s on a shared machine would take over half an hour for 1,000 cycles.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from lab.bench.common import Row, at_most, percentile, postgres_server

SECTION = "Capacity"
ONE_SESSION_CYCLES = 12
SESSIONS = 16
MEMORY_CYCLES = 1_000  # python -m lab.bench --memory-cycles N
SESSION_ROUNDS = 30  # drawings per session with 16 sessions
MEMORY_BASELINE_CYCLES = 50  # RSS growth is counted from the end of these
APP_CPU = 0


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Processes started inside run on *cpu* only (this thread's affinity, which a child
    inherits); on a machine with one CPU, no change."""
    if len(os.sched_getaffinity(0)) < 2:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# Records (page time) the first animation frame after an <h3> "Prediction: N" is in the DOM.
_WATCH_PREDICTION = """() => {
  window.__predictionShownMs = null;
  const shown = () => [...document.querySelectorAll('h3')]
    .some((h) => h.textContent.includes('Prediction:'));
  const observer = new MutationObserver(() => {
    if (!shown()) return;
    observer.disconnect();
    requestAnimationFrame(() => { window.__predictionShownMs = performance.now(); });
  });
  observer.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


@dataclass
class Load:
    """What one app process did while *sessions* sessions drew *rounds* digits each."""

    sessions: int
    rounds: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # mouse-up to prediction on screen
    runs_ms: list[float] = field(default_factory=list)  # a drawing's run as the page saw it
    cpu_s: float = 0.0  # app process (all its threads), user + system, over the rounds
    wall_s: float = 0.0

    @property
    def cycles(self) -> int:
        return self.sessions * self.rounds

    @property
    def cpu_ms_per_cycle(self) -> float:
        return self.cpu_s * 1000 / self.cycles

    @property
    def cycles_per_s(self) -> float:
        return self.cycles / self.wall_s

    @property
    def utilisation(self) -> float:
        """The app's CPU seconds per second of the run: 1.0 is one core busy all the time."""
        return self.cpu_s / self.wall_s


def drive(browser, app, sessions: int, rounds: int) -> Load:
    """*sessions* sessions of the running *app* (lab.browser.AppProcess) each draw *rounds*
    one-stroke digits in lockstep: all hold the mouse button at the end of the stroke, then all
    release it, so the app gets the drawings at once; then all answer Correct (which saves the
    answer and clears the canvas). One warm-up drawing per session first (a session's first run
    is slower), not counted."""
    import psutil

    from lab.browser import ONE_STROKE, AppPage

    load = Load(sessions)
    process = psutil.Process(app.process.pid)
    pages = []
    try:
        for _ in range(sessions):
            pages.append(AppPage.open(browser, app.url))
        for page in pages:
            page.draw(ONE_STROKE[1])
            page.click_correct()
        cpu_before, start = sum(process.cpu_times()[:2]), time.perf_counter()
        for n in range(rounds):
            for index, page in enumerate(pages):
                assert page.prediction() is None
                page.page.evaluate(_WATCH_PREDICTION)
                page.draw_held(ONE_STROKE[(1, 7)[(index + n) % 2]])
            for page in pages:
                page.release()
            for page in pages:
                released = page.last_pointer_up_ms()
                run = page.wait_for_drawing()
                page.wait_for_prediction()
                shown = page.page.evaluate("() => window.__predictionShownMs")
                load.latencies_ms.append(shown - released)
                load.runs_ms.append(run.finished_ms - run.started_ms)
            clicked = []
            for page in pages:
                clicked.append(page.mark())
                page.button("correct").click()
            for page, mark in zip(pages, clicked, strict=True):
                page.wait_until_idle(mark)
            load.rounds += 1
        load.cpu_s = sum(process.cpu_times()[:2]) - cpu_before
        load.wall_s = time.perf_counter() - start
    finally:
        for page in pages:
            page.close()
    return load


@dataclass
class MixedLoad(Load):
    """``Load`` of one Chromium page among protocol sessions: ``latencies_ms`` are the page's,
    ``protocol_ms`` the protocol sessions' (sending to the prediction's message, plus the
    debounce)."""

    protocol_ms: list[float] = field(default_factory=list)


def drive_mixed(browser, app, sessions: int, rounds: int) -> MixedLoad:
    """*sessions* sessions of the running *app* draw *rounds* one-stroke digits each in
    lockstep: one Chromium page (mouse-up to the prediction on screen) and ``sessions - 1``
    protocol sessions, which send their drawings when the page's canvas sends its own; then all
    answer Correct. One warm-up round first, not counted."""
    import asyncio
    import threading

    import psutil

    from lab import protocol
    from lab.browser import CANVAS_DEBOUNCE_MS, ONE_STROKE, AppPage

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def call(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop)

    load, process, others = MixedLoad(sessions), psutil.Process(app.process.pid), []
    try:
        with AppPage.open(browser, app.url) as page:
            others = [call(protocol.Session(app.url).open()).result() for _ in range(sessions - 1)]
            cpu_before = start = None
            for n in range(rounds + 1):
                if n == 1:
                    cpu_before, start = sum(process.cpu_times()[:2]), time.perf_counter()
                strokes = ONE_STROKE[(1, 7)[n % 2]]
                assert page.prediction() is None
                page.page.evaluate(_WATCH_PREDICTION)
                page.draw_held(strokes)
                page.release()
                time.sleep(CANVAS_DEBOUNCE_MS / 1000)
                drawn = call(protocol.draw_all(others, strokes))
                released = page.last_pointer_up_ms()
                page.wait_for_drawing()
                page.wait_for_prediction()
                shown = page.page.evaluate("() => window.__predictionShownMs")
                protocol_ms = [seconds * 1000 + CANVAS_DEBOUNCE_MS for seconds in drawn.result()]
                mark = page.mark()
                page.button("correct").click()
                corrected = call(protocol.correct_all(others))
                page.wait_until_idle(mark)
                corrected.result()
                if n:
                    load.latencies_ms.append(shown - released)
                    load.protocol_ms += protocol_ms
                    load.rounds += 1
            load.cpu_s = sum(process.cpu_times()[:2]) - cpu_before
            load.wall_s = time.perf_counter() - start
    finally:
        for session in others:
            call(session.close()).result()
        loop.call_soon_threadsafe(loop.stop)
    return load


def pinned_load(browser, database_url: str, sessions: int, rounds: int, drive=drive) -> Load:
    """*drive* against a new app process started on APP_CPU."""
    from lab.browser import AppProcess

    app = AppProcess(database_url)
    try:
        with pinned(APP_CPU):
            app.start()
        return drive(browser, app, sessions, rounds)
    finally:
        app.stop()


def memory_run(cycles: int, database_url: str) -> list[float]:
    """In this process: *cycles* drawing cycles through AppTest (the canvas's value set as a
    browser sends it, Correct clicked, the canvas cleared), garbage collection after each run
    off as in .streamlit/config.toml. Returns the RSS in MB after each cycle."""
    import base64
    import io

    import psutil
    from PIL import Image, ImageDraw
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    import utils
    from lab.bench.common import ROOT
    from lab.browser import ONE_STROKE, fabric_path
    from ui.session import ANALYSIS, CANVAS_GENERATION, CORRECT_BUTTON, feedback_key

    config.set_option("runner.postScriptGC", False)
    os.environ["DATABASE_URL"] = database_url
    pngs = []
    for digit in (1, 7):
        image = Image.new("RGBA", (utils.CANVAS_SIZE,) * 2, (0, 0, 0, 255))
        for stroke in ONE_STROKE[digit]:
            ImageDraw.Draw(image).line(stroke, fill="white", width=utils.BRUSH_WIDTH, joint="curve")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    process, rss = psutil.Process(), []
    for n in range(cycles):
        key = f"canvas-{at.session_state[CANVAS_GENERATION]}"
        objects = [fabric_path(stroke) for stroke in ONE_STROKE[(1, 7)[n % 2]]]
        at.session_state[key] = {"drawing": {"raw": {"objects": objects}, "data": pngs[n % 2]}}
        at.run()
        analysis = at.session_state[ANALYSIS]
        at.button(key=feedback_key(CORRECT_BUTTON, analysis)).click().run()
        assert not at.exception and at.session_state[CANVAS_GENERATION] == n + 1, at.exception
        rss.append(process.memory_info().rss / 2**20)
    return rss


def memory_growth(cycles: int, database_url: str) -> tuple[list[float], float]:
    """``memory_run`` in a new process; its RSS after each cycle and its CPU seconds."""
    import json
    import subprocess
    import sys

    from lab.bench.common import ROOT, child_env

    command = [sys.executable, "-m", "lab.bench.capacity", str(cycles), database_url]
    start = os.times()
    result = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, check=False
    )
    end = os.times()
    if result.returncode:
        raise RuntimeError(f"memory run failed: {result.stderr[-2000:]}")
    cpu = end.children_user + end.children_system - start.children_user - start.children_system
    return json.loads(result.stdout.splitlines()[-1]), cpu


def shadow_run(rounds: int = ONE_SESSION_CYCLES, repeats: int = 2) -> list[Row]:
    """``python -m lab.bench --only shadow``: the app's CPU per drawing cycle, 1 session, with a
    version in shadow (``versions.py shadow``) and without, alternately, *repeats* times each,
    a new app process each time, the live version the model file and the shadow another version
    of the same size (lab.bench.inference.other_version)."""
    import io

    import torch

    import model
    from lab.bench.inference import other_version
    from lab.browser import chromium
    from registry import store

    net = model.load_model(model.model_path())
    buffer = io.BytesIO()
    torch.save(other_version(net).state_dict(), buffer)
    loads: dict[bool, list[Load]] = {False: [], True: []}
    with postgres_server(durable=True) as server, chromium() as browser:
        with store.connect(server.url) as conn:
            store.ensure_live(conn, model.model_path())
            shadow = store.register(conn, buffer.getvalue(), {"bench": "shadow"})
        for _ in range(repeats):
            for on in (False, True):
                store.set_shadow(shadow if on else None, conninfo=server.url)
                loads[on].append(pinned_load(browser, server.url, 1, rounds))
    without, beside = ([load.cpu_ms_per_cycle for load in loads[on]] for on in (False, True))
    runs = ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(without, beside, strict=True))
    note = (
        f"{rounds} cycles per run, 1 Chromium session, app pinned to CPU 0; runs alternated, "
        f"each a new app process (without / with: {runs} ms)"
    )
    mean = [sum(values) / len(values) for values in (without, beside)]
    return [
        Row(SECTION, "app CPU per drawing cycle, 1 session, no shadow", mean[0], "ms", note=note),
        Row(SECTION, "app CPU per drawing cycle, 1 session, a shadow set", mean[1], "ms"),
        at_most(SECTION, "a shadow's cost per drawing cycle", mean[1] - mean[0], "ms", 10),
    ]


def run(memory_cycles: int = MEMORY_CYCLES) -> list[Row]:
    from lab.browser import chromium

    with postgres_server(durable=True) as server:
        with chromium() as browser:
            one = pinned_load(browser, server.url, 1, ONE_SESSION_CYCLES)
            many = pinned_load(browser, server.url, SESSIONS, SESSION_ROUNDS, drive_mixed)
        rss, memory_cpu = memory_growth(memory_cycles, server.url)
    pinning = "app pinned to CPU 0 (as taskset -c 0), Chromium not pinned"
    mixed = f"1 Chromium page, {SESSIONS - 1} sessions over Streamlit's protocol: lab/protocol.py"
    baseline = min(MEMORY_BASELINE_CYCLES, len(rss)) - 1
    return [
        at_most(
            SECTION,
            "app CPU per drawing cycle, 1 session",
            one.cpu_ms_per_cycle,
            "ms",
            80,
            note=f"{ONE_SESSION_CYCLES} cycles (drawing, prediction, Correct, saved, canvas "
            "cleared): user + system CPU of the streamlit process and its threads (/proc); "
            f"{pinning}",
        ),
        Row(
            SECTION,
            f"app CPU per drawing cycle, {SESSIONS} sessions",
            many.cpu_ms_per_cycle,
            "ms",
            note=f"{many.cycles} cycles, {SESSIONS} sessions in lockstep ({mixed}); {pinning}",
        ),
        Row(
            SECTION,
            "drawing cycles per second, one app process on one core",
            1000 / many.cpu_ms_per_cycle,
            "/s",
            note=f"1 s / the CPU per cycle with {SESSIONS} sessions. Measured in the same run: "
            f"{many.cycles_per_s:.1f} cycles/s with the app's core {many.utilisation:.0%} busy "
            "(lockstep: everyone waits for the slowest, then for the browser page)",
        ),
        at_most(
            SECTION,
            f"{SESSIONS} sessions drawing at once: mouse-up to prediction on screen, p95",
            percentile(many.latencies_ms, 95),
            "ms",
            1500,
            note=f"the Chromium page, {many.rounds} drawings, each sent with {SESSIONS - 1} "
            f"others: p50 {percentile(many.latencies_ms, 50):.0f} ms, max "
            f"{max(many.latencies_ms):.0f} ms; includes the canvas's 200 ms debounce; {pinning}",
        ),
        Row(
            SECTION,
            f"{SESSIONS} sessions drawing at once: the app's part, p95",
            percentile(many.protocol_ms, 95),
            "ms",
            note=f"the {SESSIONS - 1} protocol sessions, {len(many.protocol_ms)} drawings: the "
            "200 ms debounce plus sending the drawing to receiving the message that shows its "
            f"prediction (no rendering); p50 {percentile(many.protocol_ms, 50):.0f} ms, max "
            f"{max(many.protocol_ms):.0f} ms",
        ),
        at_most(
            SECTION,
            f"RSS growth over {len(rss)} drawing cycles after the first {baseline + 1}",
            rss[-1] - rss[baseline],
            "MB",
            50,
            note=f"{rss[baseline]:.0f} MB after {baseline + 1} cycles, {max(rss):.0f} MB at most; "
            "one process, no garbage collection after each run; driven by AppTest, not a "
            f"browser (module docstring); {memory_cpu * 1000 / len(rss):.0f} ms CPU per cycle "
            "there; --memory-cycles N sets the count",
        ),
    ]


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(memory_run(int(sys.argv[1]), sys.argv[2])))
