"""Drive the real app (``streamlit run app.py``) in headless Chromium, like a person would.

``AppProcess(database_url)``: the app on 127.0.0.1 (a context manager). ``chromium()``: a headless
Chromium. ``AppPage.open(browser, url, **PHONES["390x844"])`` (no phone: a desktop window): a new
Streamlit session, its first run finished (slow in a new process: torch import, model load).
Actions (``draw``, ``touch_draw``, ``click_correct``, ``submit_correction``, ``tap``, ...) return
once the app has finished the runs they triggered, as a ``Run`` (page-clock ms of start and end).

How "finished" is known: an init script records each change of the app root's
``data-test-script-state`` (running, notRunning) in page time; Playwright hands each message the
page receives to ``AppPage._received``, which counts the runs that ended (Streamlit's own message
classes). After an action, the page is idle when a run has ended since the action, none is
pending after an ``st.rerun()``, the page says notRunning, nothing came for ``QUIET_MS``, nothing
is stale, every image is loaded and no element waits for its code (Streamlit's placeholders).
A drawing is sent by the canvas 200 ms after the mouse-up.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Browser, BrowserContext, Locator, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

import drawings
from lab import free_port
from utils import BRUSH_WIDTH, CANVAS_SIZE

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
# Browser contexts of phones held upright: touch screens at 3 device pixels per CSS pixel.
_PHONE = {"device_scale_factor": 3, "is_mobile": True, "has_touch": True}
PHONES = {
    f"{w}x{h}": {"viewport": {"width": w, "height": h}, **_PHONE}
    for w, h in [(390, 844), (360, 740)]
}
ACTION_TIMEOUT_MS = 60_000  # generous: the machine is slow and shared
FIRST_RUN_TIMEOUT_MS = 120_000  # a new process imports torch and loads the model
QUIET_MS = 250
CANVAS_DEBOUNCE_MS = 200  # streamlit-drawable-canvas sends a drawing 200 ms after a mouse-up


Point = tuple[float, float]
Stroke = Sequence[Point]


def ellipse(cx: float, cy: float, rx: float, ry: float, tilt_deg: float) -> list[Point]:
    """A closed oval of 40 points and 2 past the start (as a hand closes a loop), from the top."""
    cos, sin = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
    angles = [-math.pi / 2 - 2 * math.pi * i / 40 for i in range(43)]
    ovals = [(rx * math.cos(a), ry * math.sin(a)) for a in angles]
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in ovals]


# One stroke each: sent once, 200 ms after its only mouse-up (for load tests and benchmarks).
ONE_STROKE = {
    1: [[(150, 52), (146, 100), (141, 150), (137, 200), (134, 236)]],
    7: [[(74, 64), (134, 59), (194, 58), (208, 60), (190, 98), (154, 176), (128, 238)]],
}
# Digits as a person draws them on the 280x280 canvas, stroke by stroke, slightly wobbly.
DIGIT_STROKES: dict[int, list[list[Point]]] = {
    7: [  # the top bar, the diagonal from its right end, the crossbar
        [(74, 64), (102, 61), (134, 59), (166, 58), (194, 58), (208, 60)],
        [(207, 64), (190, 98), (172, 136), (154, 176), (139, 210), (128, 238)],
        [(132, 150), (158, 149), (186, 147)],
    ],
    0: [ellipse(140, 142, 56, 92, tilt_deg=10)],
    1: [[(118, 84), (134, 68), (150, 52)], ONE_STROKE[1][0]],  # a lead-in flick, the stroke
    4: [  # the open left part, then the long vertical
        [(112, 50), (96, 104), (82, 158), (150, 156), (212, 154)],
        [(176, 92), (174, 150), (171, 206), (170, 240)],
    ],
}
ONE_STROKE[0] = DIGIT_STROKES[0]


class AppProcess:
    """``streamlit run app.py`` on 127.0.0.1 with ``DATABASE_URL=database_url``, its output in
    ``log_path``; ``start()`` waits until ``/_stcore/health`` answers (a context manager)."""

    def __init__(self, database_url: str, log_path: Path | None = None, port: int | None = None):
        """*port*: this one (a new process where a stopped one served), else a free one."""
        self.database_url, self.process, self.url, self.port = database_url, None, "", port
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="app-")) / "app.log"

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 120.0) -> AppProcess:
        for _ in range(3):  # another process may take the free port before streamlit binds it
            port = self.port or free_port()
            self.url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "streamlit", "run", "app.py", f"--server.port={port}"]
            command += ["--server.headless=true", "--server.address=127.0.0.1"]
            command += ["--server.fileWatcherType=none", "--browser.gatherUsageStats=false"]
            env = dict(os.environ, DATABASE_URL=self.database_url, PYTHONUNBUFFERED="1")
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            deadline = time.monotonic() + timeout
            while self.is_running and time.monotonic() < deadline:
                health = f"{self.url}/_stcore/health"
                with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as r:
                    if r.read().strip() == b"ok":
                        return self
                time.sleep(0.1)
            self.stop()
            if "already in use" not in self.log_text():
                break
        raise RuntimeError(f"the app never got healthy:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after *timeout*."""
        if self.is_running:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
            self.process.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> AppProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Playwright and a headless Chromium (``$CHROMIUM``, else /usr/bin/chromium: ``apt-get
    install chromium``), both stopped on exit."""
    executable = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as playwright:
        yield playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


class MessageGate:
    """Holds back what the app sends to one page (Playwright's WebSocket routing): ``AppPage.open(
    ..., setup=gate.install)``; ``hold()``; ``wait_for_finished_runs(page, n)``; ``release()``."""

    def __init__(self) -> None:
        self.holding, self.held, self.route = False, [], None

    def install(self, context: BrowserContext) -> None:
        context.route_web_socket(re.compile(r"/_stcore/stream"), self._route)

    def _route(self, route) -> None:
        server = route.connect_to_server()
        route.on_message(server.send)
        server.on_message(lambda msg: (self.held.append if self.holding else route.send)(msg))
        self.route = route

    def hold(self) -> None:
        self.holding = True

    def wait_for_finished_runs(self, page: Page, count: int) -> None:
        """Until *count* held messages are a run's end (streamlit's own protobuf classes)."""
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        for _ in range(3000):  # a minute
            kinds = [ForwardMsg.FromString(m).WhichOneof("type") for m in self.held]
            if kinds.count("script_finished") >= count:
                return
            page.wait_for_timeout(20)  # lets Playwright deliver the server's messages
        raise AssertionError(f"{kinds.count('script_finished')} of {count} runs held")

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for message in held:
            self.route.send(message)


# In every page, before the app's scripts: each change of the script state, in page time.
_PROBE = """(() => {
  const probe = window.__probe = {states: [], pointerUp: -1};
  const note = (state) => {
    const last = probe.states[probe.states.length - 1];
    if (!last || last[1] !== state) probe.states.push([performance.now(), state]);
  };
  new MutationObserver((records) => {
    records.forEach((record, i) => {  // each change, even several before this callback
      if (record.type !== 'attributes') return;
      const next = records.slice(i + 1).find((r) => r.type === 'attributes');
      note(next ? next.oldValue : record.target.getAttribute(record.attributeName));
    });
    const app = document.querySelector('[data-testid="stApp"]');  // also: the root appearing
    if (app) note(app.getAttribute('data-test-script-state'));
  }).observe(document, {attributeFilter: ['data-test-script-state'], attributeOldValue: true,
                        childList: true, subtree: true});
  for (const type of ['pointerup', 'mouseup', 'touchend']) {
    addEventListener(type, () => { probe.pointerUp = performance.now(); }, true);
  }
})();"""

# When the page is idle: [the first "running" at or after `since` (else `since`), the last
# "notRunning"], once it has been notRunning for `quietMs`, nothing stale, every image loaded,
# no placeholder.
_IDLE = """({since, quietMs}) => {
  const states = window.__probe.states;
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return null;
  const [end, last] = states[states.length - 1];
  if (last !== 'notRunning' || performance.now() - end < quietMs) return null;
  if (document.querySelector('[data-stale="true"]')) return null;
  // an element whose code Streamlit still loads (tables, radios: a React Suspense placeholder)
  if (document.querySelector('[data-testid="stSkeleton"]')) return null;
  if (![...document.images].every((img) => img.complete)) return null;
  const started = states.find(([t, s]) => s === 'running' && t >= since);
  return [started ? started[0] : since, Math.max(end, since)];
}"""

_INK_PIXELS = """(canvases) => canvases.reduce((total, canvas) => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 0; i < data.length; i += 4) ink += data[i] >= 200 && data[i + 3] >= 200;
  return total + ink;
}, 0)"""


@dataclass(frozen=True)
class Run:
    """One script run as the page saw it, page-clock milliseconds."""

    started_ms: float  # the app root went "running" (or the action began, if it already was)
    finished_ms: float  # ... and "notRunning" for good


@dataclass(frozen=True)
class ShownPrediction:
    digit: int
    confidence_percent: float  # as shown, to 0.1


class AppPage(contextlib.AbstractContextManager):
    """One session of the app in its own browser context. See the module docstring."""

    def __init__(self, context: BrowserContext, page: Page, screenshots: Path | None):
        self.context, self.page, self.screenshots, self.snaps = context, page, screenshots, 0
        self.runs_finished, self.rerun_pending, self.last_message = 0, False, time.monotonic()
        page.on("websocket", lambda socket: socket.on("framereceived", self._received))

    def _received(self, frame: str | bytes) -> None:
        """Counts the runs that ended (Streamlit's message classes): React may batch a fast run
        away from the page, and after an st.rerun() the page shows notRunning till the next."""
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        self.last_message = time.monotonic()
        message = ForwardMsg.FromString(frame) if isinstance(frame, bytes) else ForwardMsg()
        if message.WhichOneof("type") == "new_session":
            self.rerun_pending = False
        elif message.WhichOneof("type") == "script_finished":
            self.rerun_pending = message.script_finished == ForwardMsg.FINISHED_EARLY_FOR_RERUN
            self.runs_finished += not self.rerun_pending

    @classmethod
    def open(cls, browser: Browser, url: str, screenshots=None, setup=None, **options) -> AppPage:
        """*setup(context)* runs before the page loads; *options* go to ``new_context``."""
        context = browser.new_context(**{"viewport": {"width": 1280, "height": 1000}, **options})
        try:
            context.add_init_script(_PROBE)
            context.set_default_timeout(ACTION_TIMEOUT_MS)
            if setup is not None:
                setup(context)
            app = cls(context, context.new_page(), screenshots)
            app.page.goto(url, timeout=FIRST_RUN_TIMEOUT_MS)
            app.wait_until_idle((0, 0), FIRST_RUN_TIMEOUT_MS)
        except BaseException:
            context.close()
            raise
        return app

    def close(self) -> None:
        with contextlib.suppress(PlaywrightError):
            self.context.close()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def snap(self, step: str) -> None:
        """A full-page screenshot, ``<screenshots>/NN-step.png``, if a folder was given."""
        if self.screenshots:
            self.snaps += 1
            path = self.screenshots / f"{self.snaps:02d}-{step}.png"
            self.page.screenshot(path=str(path), full_page=True)

    def mark(self) -> tuple[float, int]:
        """Now, for ``wait_until_idle``: the page time and the number of runs finished so far."""
        return self.page.evaluate("() => performance.now()"), self.runs_finished

    def last_pointer_up_ms(self) -> float:
        return self.page.evaluate("() => window.__probe.pointerUp")

    def wait_until_idle(self, mark: tuple[float, int], timeout_ms=ACTION_TIMEOUT_MS) -> Run:
        """Wait until a run finished after *mark* (``mark()`` before an action of your own) and
        the app has been idle for ``QUIET_MS``: no run pending, no message, nothing stale."""
        since, finished_before = mark
        deadline = time.monotonic() + timeout_ms / 1000
        while True:  # Playwright calls _received meanwhile
            idle = self.page.evaluate(_IDLE, {"since": since, "quietMs": QUIET_MS})
            quiet = time.monotonic() - self.last_message > QUIET_MS / 1000
            if idle and quiet and self.runs_finished > finished_before and not self.rerun_pending:
                return Run(*idle)
            if time.monotonic() > deadline:
                states = self.page.evaluate("() => window.__probe.states.slice(-5)")
                pending = f"{self.runs_finished} runs ended, rerun pending: {self.rerun_pending}"
                raise TimeoutError(f"no run ended in {timeout_ms} ms; {pending}; page: {states}")
            self.page.wait_for_timeout(50)

    def release(self) -> None:
        """Lift the mouse button ``draw_held`` holds: the canvas sends the drawing 200 ms later."""
        finished = self.runs_finished
        self.page.mouse.up()
        self._sent(finished)

    def _sent(self, finished: int) -> None:
        """*finished*: the runs ended before the pointer went up. Counted after, a busy machine
        can let the drawing's own run end (and be counted) before ``last_pointer_up_ms`` returns."""
        sent = self.last_pointer_up_ms() + CANVAS_DEBOUNCE_MS - 5  # the drawing, not sent yet
        self.drawing_mark = (sent, finished)

    def wait_for_drawing(self) -> Run:
        """Wait for the run of the drawing sent after the last ``release`` or draw."""
        return self.wait_until_idle(self.drawing_mark)

    def _act(self, action: Callable[[], object]) -> Run:
        mark = self.mark()
        action()
        return self.wait_until_idle(mark)

    def canvas(self) -> Locator:
        """fabric.js's drawing surface: the top canvas layer, which takes the mouse."""
        return self.page.locator('[class*="st-key-canvas-"] canvas.upper-canvas')

    def ink_pixels(self) -> int:
        """White (drawn) pixels on the canvas layers: 0 for a blank canvas."""
        return self.page.locator('[class*="st-key-canvas-"] canvas').evaluate_all(_INK_PIXELS)

    def _on_screen(self, stroke: Stroke, step_px: float = 4.0) -> list[Point]:
        """*stroke* (canvas pixels) in page coordinates, a point every *step_px* at most, the
        canvas scrolled into view and located again for each stroke (a rerun may move it)."""
        surface = self.canvas()
        surface.scroll_into_view_if_needed()
        box = surface.bounding_box()
        assert box is not None, "the canvas is not visible"
        points = [stroke[0]]
        for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
            steps = max(1, math.ceil(math.dist((x0, y0), (x1, y1)) / step_px))
            points += [
                (x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps)
                for i in range(1, steps + 1)
            ]
        scale_x, scale_y = box["width"] / CANVAS_SIZE, box["height"] / CANVAS_SIZE
        return [(box["x"] + x * scale_x, box["y"] + y * scale_y) for x, y in points]

    def draw_held(self, strokes: Sequence[Stroke]) -> None:
        """Draw *strokes* with the mouse (down, moves, up), but keep the button down at the end
        of the last one: ``release()`` lifts it."""
        for number, stroke in enumerate(strokes):
            if number:
                self.page.mouse.up()
            first, *rest = self._on_screen(stroke)
            self.page.mouse.move(*first)
            self.page.mouse.down()
            for point in rest:
                self.page.mouse.move(*point)

    def draw(self, strokes: Sequence[Stroke]) -> Run:
        """Draw *strokes* (lists of canvas pixels, origin top left) and wait for the run."""
        self.draw_held(strokes)
        self.release()
        return self.wait_for_drawing()

    def draw_digit(self, digit: int) -> Run:
        return self.draw(DIGIT_STROKES[digit])

    def touch_draw(self, strokes: Sequence[Stroke]) -> Run:
        """Draw *strokes* with one finger (CDP Input.dispatchTouchEvent; the context needs
        ``has_touch=True``, as ``PHONES`` have) and wait for the run."""
        cdp = self.context.new_cdp_session(self.page)
        try:
            for stroke in strokes:
                first, *rest = self._on_screen(stroke)
                for kind, points in [("touchStart", [first]), *(("touchMove", [p]) for p in rest)]:
                    touch_points = [{"x": x, "y": y} for x, y in points]
                    cdp.send(
                        "Input.dispatchTouchEvent", {"type": kind, "touchPoints": touch_points}
                    )
                finished = self.runs_finished  # before the last lift: see _sent
                cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        finally:
            cdp.detach()
        self._sent(finished)
        return self.wait_for_drawing()

    def prediction(self) -> ShownPrediction | None:
        headings = self.page.locator("h3", has_text="Prediction:").all_inner_texts()
        if not headings:
            return None
        (heading,) = headings
        digit = re.fullmatch(r"Prediction: (\d)", heading.strip())
        confidence = self.page.locator("strong", has_text="Confidence:").inner_text().strip()
        percent = re.fullmatch(r"Confidence: (\d+(?:\.\d+)?)%", confidence)
        assert digit and percent, (heading, confidence)
        return ShownPrediction(int(digit.group(1)), float(percent.group(1)))

    def wait_for_prediction(self) -> ShownPrediction:
        self.page.locator("h3", has_text="Prediction:").wait_for()
        return self.prediction()

    def alerts(self) -> list[str]:
        """Texts of the st.success/info/warning/error boxes, top to bottom."""
        return [text.strip() for text in self.page.get_by_test_id("stAlert").all_inner_texts()]

    def button(self, key: str) -> Locator:
        """The feedback button *key* (ui.session.CORRECT_BUTTON, ...) of the drawing on screen."""
        return self.page.locator(f'[class*="st-key-{key}-"] button')

    def true_label_input(self) -> Locator:
        return self.page.locator('[class*="st-key-true_label-"] input')

    def type_true_label(self, text: str) -> None:
        """Type *text* in True label, replacing what is there (sent with the next action)."""
        field = self.true_label_input()
        field.fill("")
        field.press_sequentially(text)

    def tap(self, locator: Locator) -> Run:
        return self._act(locator.tap)

    def click_correct(self) -> Run:
        return self._act(self.button("correct").click)

    def submit_correction(self, text: str | None = None) -> Run:
        if text is not None:
            self.type_true_label(text)
        return self._act(self.button("submit_correction").click)

    def toggle_why(self) -> Run:
        """Open (or close) "Why?" under the prediction."""
        return self._act(self.page.locator(".st-key-why label").click)

    def why_maps(self) -> Locator:
        """The pictures "Why?" shows (one per model, and both together)."""
        return self.page.locator(".st-key-why_maps img")

    def open_history(self) -> Run:
        return self._act(self.page.get_by_role("link", name="History").click)

    def open_draw(self) -> Run:
        return self._act(self.page.get_by_role("link", name="Draw").click)


def fabric_path(points: list[tuple[float, float]]) -> dict:
    """A stroke through *points* as the canvas's JSON holds it (fabric.js 7's pencil brush):
    M, a Q per point but the last (the point as control, the midpoint to the next as end), L."""
    path = [["M", *points[0]]]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        path.append(["Q", x0, y0, (x0 + x1) / 2, (y0 + y1) / 2])
    path.append(["L", *points[-1]])
    left, top = drawings._path_centre(path)  # where fabric.js puts an unedited stroke
    return {"type": "Path", "originX": "center", "originY": "center", "left": left, "top": top,
            "strokeWidth": BRUSH_WIDTH, "path": path}  # fmt: skip
