"""Drive the real app (``streamlit run app.py``) in headless Chromium, like a person would.

Plain classes and functions (no fixtures), for the browser tests, benchmarks and load or
fault drills: ``import browser`` from a test module (``tests/`` is on ``sys.path`` under
pytest), or ``sys.path.insert(0, "tests")`` from a script run at the project root.

The app process
    ``AppProcess(database_url, port=None, env=None, log_path=None)``: the app on
    127.0.0.1 with ``DATABASE_URL=database_url``, cwd the project root, the shipped model
    (set ``MODEL_PATH`` in *env* for another). ``start(timeout)`` waits for
    ``/_stcore/health`` and returns self; ``stop()`` (SIGTERM, then SIGKILL) returns the exit
    code; also a context manager. ``url``, ``port``, ``pid``, ``is_running``, ``log_path``,
    ``log_text()``. Raises ``AppStartError`` (with the log's tail) if it exits or never gets
    healthy. The first session of a new process is slow (~10 s: torch import and model load);
    warm it up with one ``AppPage.open`` before timing anything.

The browser
    ``chromium()``: context manager starting Playwright and yielding a Chromium ``Browser``
    (the binary at ``$CHROMIUM``, default ``/usr/bin/chromium``; ``ChromiumMissing`` says to
    ``apt-get install chromium`` if absent). ``launch_chromium(playwright)`` does the launch
    alone, for callers that manage Playwright themselves.

A session of the app
    ``AppPage.open(browser, app_url, path="", screenshots=None)``: a new browser context (a
    new Streamlit session), the page loaded and its first script run finished. ``close()``.
    Every action waits until the app has *finished* the script run it triggered (see
    ``wait_until_idle``) and returns a ``Run`` (page-clock times in ms of the message that
    asked for the run and of its end, ``.seconds`` between them):

    - ``draw(strokes)``: strokes are lists of (x, y) points in canvas pixels (0-280, origin at
      the top left); each is drawn as mouse down, moves of at most ``step_px`` pixels, mouse
      up. Waits for the canvas to send the drawing (200 ms after the last mouse-up) and for
      the run that handles it. ``draw_digit(d)`` draws ``DIGIT_STROKES[d]``.
      ``touch_draw(strokes)`` draws them with a finger (a context made with one of ``PHONES``:
      ``AppPage.open(..., **PHONES["390x844"])``); ``tap(locator)``.
    - ``click_correct()``, ``submit_correction(text)`` (types *text* in True label first
      unless None), ``type_true_label(text)``, ``open_history()``, ``open_draw()``.
    - ``wait_for_prediction()`` -> ``ShownPrediction(digit, confidence_percent)``, raising if
      none is shown; ``prediction()`` -> the shown one or None.
    - Reading the page: ``alerts()`` (texts of all st.success/info/warning/error boxes),
      ``true_label_value()``, ``canvas_generation()`` (n in the canvas key ``canvas-{n}``),
      ``ink_pixels()`` (white pixels on the drawing canvases: 0 when blank),
      ``history_rows()`` -> ``[HistoryRow]`` as the History table lists them,
      ``metric(label)``.
    - ``snap(step)``: a full-page screenshot if *screenshots* was given.
    - Lower level: ``page`` (the Playwright Page), ``goto(path)``, ``now_ms()``,
      ``wait_until_idle(since_ms)`` (after any action of your own: pass ``now_ms()`` read
      before it), ``canvas()`` (fabric's upper canvas, which takes the mouse),
      ``canvas_element()``, ``button(key)``, ``true_label_input()``.

    Drawings: ``DIGIT_STROKES`` (0, 1, 4, 7 drawn like a person, several strokes but the 0),
    ``ellipse(...)`` for round strokes. Other helpers: ``free_port()``, ``slug(name)``.

    ``Run`` timings are for benchmarks: ``draw(...).finished_ms - app.last_pointer_up_ms()`` is
    what a person waits from lifting the mouse to the prediction (200 ms of it is the canvas's
    debounce).

Screenshots
    ``Screenshots(directory)`` empties *directory* of PNGs; ``take(page, step)`` writes
    ``NN-step.png``. ``artifacts_dir(name)`` is ``test-artifacts/<name>`` (git-ignored, uploaded
    by CI when a run fails).

How "finished" is known: an init script in every page records, in page time, each
``rerun_script`` message the page sends and each ``new_session`` (a run started),
``script_finished`` and ``session_status_changed`` message it receives (top-level protobuf
fields, read without a protobuf library). The app is idle when the last request was answered
by a successful ``script_finished``, no run started since, nothing was received for
``QUIET_MS`` (a run that ends just as the next request arrives is followed at once by the
next one), and the page shows no stale element and no image still loading. No fixed sleeps.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from playwright.sync_api import Browser, BrowserContext, Locator, Page, Playwright, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"

CHROMIUM_DEFAULT = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 1000}
# Browser contexts of phones held upright: touch screens at 3 device pixels per CSS pixel.
PHONES = {
    f"{width}x{height}": {
        "viewport": {"width": width, "height": height},
        "device_scale_factor": 3,
        "is_mobile": True,
        "has_touch": True,
    }
    for width, height in [(390, 844), (360, 740)]
}

STARTUP_TIMEOUT_S = 120.0
ACTION_TIMEOUT_MS = 60_000  # generous: the machine is slow and shared
FIRST_RUN_TIMEOUT_MS = 120_000  # a new process imports torch and loads the model
QUIET_MS = 200
CANVAS_DEBOUNCE_MS = 200  # streamlit-drawable-canvas sends a drawing 200 ms after a mouse-up

CANVAS_SIZE = 280

Point = tuple[float, float]
Stroke = Sequence[Point]


# --- drawings ------------------------------------------------------------------------------


def ellipse(
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    *,
    points: int = 40,
    tilt_deg: float = 0.0,
    start_deg: float = -90.0,
    overshoot: int = 2,
) -> list[Point]:
    """An ellipse as one closed stroke of *points* points (+ *overshoot* past the start, as a
    hand closes a loop), counter-clockwise on screen from *start_deg* (-90: the top)."""
    tilt = math.radians(tilt_deg)
    result = []
    for i in range(points + overshoot + 1):
        angle = math.radians(start_deg) - 2 * math.pi * i / points
        x, y = rx * math.cos(angle), ry * math.sin(angle)
        result.append(
            (
                round(cx + x * math.cos(tilt) - y * math.sin(tilt), 1),
                round(cy + x * math.sin(tilt) + y * math.cos(tilt), 1),
            )
        )
    return result


# Digits as a person draws them on the 280x280 canvas, stroke by stroke, slightly wobbly.
DIGIT_STROKES: dict[int, list[list[Point]]] = {
    # A 7: the top bar, then the diagonal from its right end, then the crossbar.
    7: [
        [(74, 64), (102, 61), (134, 59), (166, 58), (194, 58), (208, 60)],
        [(207, 64), (190, 98), (172, 136), (154, 176), (139, 210), (128, 238)],
        [(132, 150), (158, 149), (186, 147)],
    ],
    # A 0: one closed, slightly tilted oval.
    0: [ellipse(140, 142, 56, 92, points=40, tilt_deg=10)],
    # A 1: a lead-in flick, then the slanted down stroke.
    1: [
        [(118, 84), (134, 68), (150, 52)],
        [(150, 52), (146, 100), (141, 150), (137, 200), (134, 236)],
    ],
    # A 4: the open left part, then the long vertical.
    4: [
        [(112, 50), (96, 104), (82, 158), (150, 156), (212, 154)],
        [(176, 92), (174, 150), (171, 206), (170, 240)],
    ],
}


# --- artifacts -----------------------------------------------------------------------------


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "unnamed"


def artifacts_dir(name: str) -> Path:
    """test-artifacts/<name>, created."""
    path = ARTIFACTS / slug(name)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Screenshots:
    """Numbered full-page screenshots: <directory>/01-step.png, 02-..."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in self.directory.glob("*.png"):
            old.unlink()
        self.count = 0

    def take(self, page: Page, step: str) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{slug(step)}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


# --- the app process -----------------------------------------------------------------------


class AppStartError(RuntimeError):
    """The app exited or never answered its health check."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppProcess:
    """``streamlit run app.py`` on 127.0.0.1:``port`` with ``DATABASE_URL=database_url``."""

    def __init__(
        self,
        database_url: str,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        app_file: Path = ROOT / "app.py",
    ):
        self.database_url = database_url
        self._fixed_port = port
        self.port = port or free_port()
        self.extra_env = dict(env or {})
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="app-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self.app_file = Path(app_file)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(self.app_file),
            "--server.headless",
            "true",
            "--server.port",
            str(self.port),
            "--server.address",
            "127.0.0.1",
            "--server.fileWatcherType",
            "none",
            "--browser.gatherUsageStats",
            "false",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            PYTHONUNBUFFERED="1",
            STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> AppProcess:
        """Start the app and wait until ``/_stcore/health`` answers "ok"."""
        if self.is_running:
            return self
        for attempt in range(3):
            self._spawn()
            try:
                self._wait_healthy(timeout)
                return self
            except AppStartError:
                port_taken = "already in use" in self.log_text()
                self.stop()
                if self._fixed_port is not None or not port_taken or attempt == 2:
                    raise
                self.port = free_port()  # someone took the port between choice and bind
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal goes to pytest only
            )

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        health = f"{self.url}/_stcore/health"
        while True:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise AppStartError(
                    f"the app exited with code {code} before it was healthy;"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200 and response.read().strip() == b"ok":
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AppStartError(
                    f"the app did not answer {health} within {timeout:.0f} s;"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the app (SIGTERM, then SIGKILL after *timeout*); returns its exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def __enter__(self) -> AppProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"AppProcess({self.url}, pid={self.pid}, log={self.log_path})"


class MessageGate:
    """Holds back what the app sends to one browser context, so that the page keeps showing an
    older run while the server has finished newer ones (Playwright's WebSocket routing).

    ``AppPage.open(..., setup=gate.install)``; ``hold()``, then ``wait_for_finished_runs(page,
    n)`` (n runs finished on the server, unseen by the page), then ``release()``.
    """

    def __init__(self) -> None:
        self.holding = False
        self.held: list[str | bytes] = []
        self.route = None

    def install(self, context: BrowserContext) -> None:
        context.route_web_socket(re.compile(r"/_stcore/stream"), self._route)

    def _route(self, route) -> None:
        server = route.connect_to_server()
        route.on_message(server.send)
        server.on_message(self._from_server)
        self.route = route

    def _from_server(self, message: str | bytes) -> None:
        if self.holding:
            self.held.append(message)
        else:
            self.route.send(message)

    def hold(self) -> None:
        self.holding = True

    def finished_runs(self) -> int:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        count = 0
        for message in self.held:
            if isinstance(message, bytes):
                msg = ForwardMsg()
                msg.ParseFromString(message)
                count += msg.WhichOneof("type") == "script_finished"
        return count

    def wait_for_finished_runs(self, page: Page, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.finished_runs() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.finished_runs()} of {count} runs held")
            page.wait_for_timeout(20)  # lets Playwright deliver the server's messages

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for message in held:
            self.route.send(message)


# --- the browser ---------------------------------------------------------------------------


class ChromiumMissing(RuntimeError):
    """No Chromium binary where the tests look for it."""


def chromium_executable() -> str:
    path = os.environ.get("CHROMIUM", CHROMIUM_DEFAULT)
    resolved = shutil.which(path)
    if resolved is None:
        raise ChromiumMissing(
            f"Chromium not found at {path!r}: the browser tests need it. Install it with"
            " `sudo apt-get install chromium` (Debian/Ubuntu), or set CHROMIUM to its path."
        )
    return resolved


def launch_chromium(playwright: Playwright, **kwargs) -> Browser:
    return playwright.chromium.launch(
        executable_path=chromium_executable(), args=CHROMIUM_ARGS, **kwargs
    )


@contextlib.contextmanager
def chromium(**kwargs) -> Iterator[Browser]:
    """Playwright and a headless Chromium, both stopped on exit."""
    executable = chromium_executable()  # fail before starting Playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, **kwargs
        )
        try:
            yield browser
        finally:
            browser.close()


# In every page, before the app's own scripts: see the module docstring.
_PROBE_SCRIPT = """
(() => {
  if (window.__appProbe) return;
  const probe = window.__appProbe = {
    sends: [],      // page times of BackMsg rerun_script (field 11): "run the script"
    starts: [],     // ForwardMsg new_session (4): a run started
    finished: [],   // ForwardMsg script_finished (6): [time, status]; 0 and 3 are successes
    running: false, // ForwardMsg session_status_changed (9) .script_is_running (2)
    lastReceived: 0,
    lastPointerUp: 0,
  };
  const bytesOf = (data) => {
    if (data instanceof ArrayBuffer) return new Uint8Array(data);
    if (ArrayBuffer.isView(data)) {
      return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    }
    return null;
  };
  // Top-level protobuf fields: [field number, varint value or sub-array].
  const fields = (b) => {
    const out = [];
    let i = 0;
    const varint = () => {
      let result = 0, scale = 1, byte;
      do {
        byte = b[i++];
        result += (byte & 0x7f) * scale;
        scale *= 128;
      } while (byte & 0x80 && i < b.length);
      return result;
    };
    while (i < b.length) {
      const tag = varint(), field = Math.floor(tag / 8), wire = tag & 7;
      if (wire === 0) out.push([field, varint()]);
      else if (wire === 2) { const n = varint(); out.push([field, b.subarray(i, i + n)]); i += n; }
      else if (wire === 1) i += 8;
      else if (wire === 5) i += 4;
      else break;
    }
    return out;
  };
  const onSend = (data) => {
    const b = bytesOf(data);
    if (b && fields(b).some(([field]) => field === 11)) probe.sends.push(performance.now());
  };
  const onMessage = (data) => {
    const now = performance.now();
    probe.lastReceived = now;
    const b = bytesOf(data);
    if (!b) return;
    for (const [field, value] of fields(b)) {
      if (field === 4) probe.starts.push(now);
      else if (field === 6) probe.finished.push([now, value]);
      else if (field === 9) probe.running = fields(value).some(([f, v]) => f === 2 && v === 1);
    }
  };
  const Native = window.WebSocket;
  class ProbedWebSocket extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (event) => onMessage(event.data));
    }
    send(data) {
      try { onSend(data); } catch (e) {}
      return super.send(data);
    }
  }
  window.WebSocket = ProbedWebSocket;
  for (const type of ['pointerup', 'mouseup']) {
    window.addEventListener(type, () => { probe.lastPointerUp = performance.now(); }, true);
  }
})();
"""

# Truthy (the run's timings) once the app has finished the run for its last request.
_IDLE_CHECK = """
({since, quietMs}) => {
  const p = window.__appProbe;
  if (!p) return null;
  const now = performance.now();
  const lastSend = p.sends.length ? p.sends[p.sends.length - 1] : -1;
  if (since !== null && lastSend < since) return null;
  const last = p.finished[p.finished.length - 1];
  if (!last || last[0] <= lastSend || !(last[1] === 0 || last[1] === 3)) return null;
  const lastStart = p.starts.length ? p.starts[p.starts.length - 1] : -1;
  if (lastStart > last[0] || p.running || now - p.lastReceived < quietMs) return null;
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return null;
  if (document.querySelector('[data-stale="true"]')) return null;
  if (!Array.from(document.images).every((img) => img.complete)) return null;
  return {sent: lastSend, finished: last[0]};
}
"""

_INK_PIXELS = """
(canvases) => canvases.reduce((total, canvas) => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] >= 200 && data[i + 1] >= 200 && data[i + 2] >= 200 && data[i + 3] >= 200) ink++;
  }
  return total + ink;
}, 0)
"""

_PROBE_STATE = """() => {
  const p = window.__appProbe || {};
  const app = document.querySelector('[data-testid="stApp"]');
  return {
    now: performance.now(), sends: (p.sends || []).slice(-5), starts: (p.starts || []).slice(-5),
    finished: (p.finished || []).slice(-5), running: p.running, lastReceived: p.lastReceived,
    scriptState: app && app.getAttribute('data-test-script-state'),
    stale: document.querySelectorAll('[data-stale="true"]').length,
  };
}"""


@dataclass(frozen=True)
class Run:
    """One script run the page asked for: page-clock times in milliseconds."""

    sent_ms: float  # the page sent the request (-1: none, e.g. the first run of a session)
    finished_ms: float  # the page received the run's script_finished

    @property
    def seconds(self) -> float:
        return (self.finished_ms - self.sent_ms) / 1000


@dataclass(frozen=True)
class ShownPrediction:
    digit: int
    confidence_percent: float  # as shown, to 0.1


@dataclass(frozen=True)
class HistoryRow:
    time: datetime
    predicted: int
    true_label: int
    confidence_percent: float
    model: str


class AppPage:
    """One session of the app in its own browser context. See the module docstring."""

    PREDICTION_RE = re.compile(r"^Prediction: (\d)$")
    CONFIDENCE_RE = re.compile(r"^Confidence: (\d+(?:\.\d+)?)%$")

    def __init__(
        self,
        context: BrowserContext,
        page: Page,
        app_url: str,
        screenshots: Screenshots | None = None,
    ):
        self.context = context
        self.page = page
        self.app_url = app_url.rstrip("/")
        self.screenshots = screenshots

    @classmethod
    def open(
        cls,
        browser: Browser,
        app_url: str,
        path: str = "",
        *,
        screenshots: Screenshots | None = None,
        viewport: dict[str, int] | None = None,
        timeout_ms: float = FIRST_RUN_TIMEOUT_MS,
        setup: Callable[[BrowserContext], object] | None = None,
        **context_options,
    ) -> AppPage:
        """*setup*, if given, is called with the new context before the page is loaded (e.g.
        ``MessageGate().install``); *context_options* go to ``Browser.new_context`` (e.g. one of
        ``PHONES``)."""
        context = browser.new_context(viewport=viewport or VIEWPORT, **context_options)
        try:
            context.add_init_script(_PROBE_SCRIPT)
            context.set_default_timeout(ACTION_TIMEOUT_MS)
            if setup is not None:
                setup(context)
            app = cls(context, context.new_page(), app_url, screenshots)
            app.goto(path, timeout_ms=timeout_ms)
        except BaseException:
            context.close()
            raise
        return app

    def close(self) -> None:
        with contextlib.suppress(PlaywrightError):
            self.context.close()

    def __enter__(self) -> AppPage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- waiting ---

    def now_ms(self) -> float:
        return self.page.evaluate("() => performance.now()")

    def last_pointer_up_ms(self) -> float:
        return self.page.evaluate("() => window.__appProbe.lastPointerUp")

    def wait_until_idle(
        self, since_ms: float | None = None, timeout_ms: float = ACTION_TIMEOUT_MS
    ) -> Run:
        """Wait until the app has finished the run for the last request the page sent, which
        must have been sent at or after *since_ms* (page time; None: any, or none)."""
        try:
            handle = self.page.wait_for_function(
                _IDLE_CHECK,
                arg={"since": since_ms, "quietMs": QUIET_MS},
                polling=50,
                timeout=timeout_ms,
            )
        except PlaywrightTimeoutError as exc:
            state = self.page.evaluate(_PROBE_STATE)
            raise PlaywrightTimeoutError(
                f"the app did not finish a run requested after {since_ms} ms within"
                f" {timeout_ms / 1000:.0f} s; probe: {state}"
            ) from exc
        timings = handle.json_value()
        return Run(sent_ms=timings["sent"], finished_ms=timings["finished"])

    def goto(self, path: str = "", *, timeout_ms: float = FIRST_RUN_TIMEOUT_MS) -> Run:
        self.page.goto(f"{self.app_url}/{path.lstrip('/')}", timeout=timeout_ms)
        return self.wait_until_idle(None, timeout_ms)

    def _act(self, action) -> Run:
        since = self.now_ms()
        action()
        return self.wait_until_idle(since)

    def snap(self, step: str) -> Path | None:
        return self.screenshots.take(self.page, step) if self.screenshots else None

    # --- the Draw page ---

    def canvas_element(self) -> Locator:
        """The canvas component (all its <canvas> layers) of the current generation."""
        return self.page.locator('[class*="st-key-canvas-"]')

    def canvas(self) -> Locator:
        """fabric.js's drawing surface: the top layer, which takes the mouse."""
        return self.canvas_element().locator("canvas.upper-canvas")

    def canvas_generation(self) -> int:
        classes = self.canvas_element().get_attribute("class") or ""
        match = re.search(r"\bst-key-canvas-(\d+)\b", classes)
        if match is None:
            raise AssertionError(f"no canvas key in {classes!r}")
        return int(match.group(1))

    def ink_pixels(self) -> int:
        """White (drawn) pixels on the canvas layers: 0 for a blank canvas."""
        return self.canvas_element().locator("canvas").evaluate_all(_INK_PIXELS)

    def draw(self, strokes: Sequence[Stroke], *, step_px: float = 4.0) -> Run:
        """Draw *strokes* with the mouse, then wait for the app to handle the drawing.

        The canvas is located again before each stroke, as a person's eye follows it: the app
        may rerun (and move it) between strokes.
        """
        mouse = self.page.mouse
        for stroke in strokes:
            points = self._on_screen(stroke)
            mouse.move(*points[0])
            mouse.down()
            previous = points[0]
            for point in points[1:]:
                distance = math.dist(previous, point)
                mouse.move(*point, steps=max(1, math.ceil(distance / step_px)))
                previous = point
            mouse.up()
        released = self.last_pointer_up_ms()
        # The canvas sends the drawing CANVAS_DEBOUNCE_MS after the last mouse-up, no sooner.
        return self.wait_until_idle(released + CANVAS_DEBOUNCE_MS - 5)

    def draw_held(self, strokes: Sequence[Stroke], *, step_px: float = 24) -> None:
        """Draw *strokes* like ``draw``, but keep the button down at the end of the last one:
        ``page.mouse.up()`` then sends the drawing (so many sessions can send at once)."""
        mouse = self.page.mouse
        for number, stroke in enumerate(strokes):
            if number:
                mouse.up()
            points = self._on_screen(stroke)
            mouse.move(*points[0])
            mouse.down()
            for previous, point in itertools.pairwise(points):
                mouse.move(*point, steps=max(1, math.ceil(math.dist(previous, point) / step_px)))

    def touch_draw(self, strokes: Sequence[Stroke], *, step_px: float = 4.0) -> Run:
        """Draw *strokes* with one finger, as ``draw`` does with the mouse: touchStart,
        touchMove every *step_px* at most, touchEnd (CDP Input.dispatchTouchEvent; the
        context needs ``has_touch=True``)."""
        cdp = self.context.new_cdp_session(self.page)

        def touch(kind: str, *points: Point) -> None:
            touch_points = [{"x": x, "y": y} for x, y in points]
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": touch_points})

        try:
            for stroke in strokes:
                points = self._on_screen(stroke)
                touch("touchStart", points[0])
                for (x0, y0), (x1, y1) in itertools.pairwise(points):
                    steps = max(1, math.ceil(math.dist((x0, y0), (x1, y1)) / step_px))
                    for i in range(1, steps + 1):
                        touch("touchMove", (x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps))
                touch("touchEnd")
        finally:
            cdp.detach()
        released = self.last_pointer_up_ms()
        return self.wait_until_idle(released + CANVAS_DEBOUNCE_MS - 5)

    def _on_screen(self, stroke: Stroke) -> list[Point]:
        """*stroke* (canvas pixels) in page coordinates, the canvas scrolled into view."""
        surface = self.canvas()
        surface.scroll_into_view_if_needed()
        box = surface.bounding_box()
        if box is None:
            raise AssertionError("the canvas is not visible")
        scale_x, scale_y = box["width"] / CANVAS_SIZE, box["height"] / CANVAS_SIZE
        return [(box["x"] + x * scale_x, box["y"] + y * scale_y) for x, y in stroke]

    def draw_digit(self, digit: int) -> Run:
        return self.draw(DIGIT_STROKES[digit])

    def prediction(self) -> ShownPrediction | None:
        headings = [
            text.strip()
            for text in self.page.locator("h3").all_inner_texts()
            if "Prediction" in text
        ]
        if not headings:
            return None
        assert len(headings) == 1, headings
        digit = self.PREDICTION_RE.match(headings[0])
        assert digit, headings[0]
        confidence = self.page.locator("strong", has_text="Confidence:").inner_text().strip()
        percent = self.CONFIDENCE_RE.match(confidence)
        assert percent, confidence
        return ShownPrediction(int(digit.group(1)), float(percent.group(1)))

    def wait_for_prediction(self, timeout_ms: float = ACTION_TIMEOUT_MS) -> ShownPrediction:
        self.page.locator("h3", has_text="Prediction:").wait_for(timeout=timeout_ms)
        shown = self.prediction()
        assert shown is not None
        return shown

    def button(self, key: str) -> Locator:
        """The feedback button *key* (app.CORRECT_BUTTON...) of the drawing on screen."""
        return self.page.locator(f'[class*="st-key-{key}-"] button')

    def true_label_input(self) -> Locator:
        return self.page.locator('[class*="st-key-true_label-"] input')

    def true_label_value(self) -> str:
        return self.true_label_input().input_value()

    def type_true_label(self, text: str) -> None:
        """Type *text* in True label, replacing what is there (sent on the next action)."""
        field = self.true_label_input()
        field.click()
        field.fill("")
        field.press_sequentially(text)

    def tap(self, locator: Locator) -> Run:
        """Tap *locator* with a finger (a context with ``has_touch=True``)."""
        return self._act(locator.tap)

    def click_correct(self) -> Run:
        return self._act(self.button("correct").click)

    def submit_correction(self, text: str | None = None) -> Run:
        if text is not None:
            self.type_true_label(text)
        return self._act(self.button("submit_correction").click)

    def alerts(self) -> list[str]:
        """Texts of the st.success/info/warning/error boxes, top to bottom."""
        return [
            text.strip() for text in self.page.locator('[data-testid="stAlert"]').all_inner_texts()
        ]

    # --- navigation and the History page ---

    def open_history(self) -> Run:
        run = self._act(self.page.get_by_role("link", name="History").click)
        self.page.wait_for_url(re.compile(r"/history$"))
        return run

    def open_draw(self) -> Run:
        run = self._act(self.page.get_by_role("link", name="Draw").click)
        self.page.wait_for_url(re.compile(r"/draw$|/$"))
        return run

    def metric(self, label: str) -> str:
        """The value of the st.metric labelled *label*."""
        metric = self.page.locator('[data-testid="stMetric"]').filter(has_text=label)
        return metric.locator('[data-testid="stMetricValue"]').inner_text().strip()

    def history_rows(self) -> list[HistoryRow]:
        """The rows of the History page's newest answers, top to bottom.

        st.dataframe draws its cells on a <canvas> (glide-data-grid); the same grid keeps an
        accessible <table role="grid"> inside that canvas for screen readers, with the raw
        values (unformatted: full-precision confidence, ISO time) of the rows in view.
        """
        tables = self.page.locator('[data-testid="stDataFrame"] table[role="grid"]')
        # The newest answers' table, not whichever grid is drawn last so far.
        table = tables.filter(has=self.page.locator("thead th", has_text="true label"))
        table.wait_for(state="attached")
        header = table.locator("thead th").all_text_contents()
        assert header == ["time", "predicted", "true label", "confidence", "model"], header
        cells = table.locator("tbody tr").evaluate_all(
            "rows => rows.map(row => Array.from(row.cells).map(cell => cell.textContent))"
        )
        return [
            HistoryRow(
                time=datetime.fromisoformat(time_text),
                predicted=int(predicted),
                true_label=int(true_label),
                confidence_percent=float(confidence),
                model=model,
            )
            for time_text, predicted, true_label, confidence, model in cells
        ]
