"""The Docker Swarm stack (deploy/stack.yml, deploy/stack-deploy.sh) on a real engine: a
single-node swarm of its own (lab/swarm.py: `docker swarm init` here, `leave` after, even when a
test fails), 3 app replicas behind Caddy, 12 browser sessions (lab/browser.py).

One stack for the module, deployed as a person does it (`deploy/stack-deploy.sh NAME`); the
drills run in order on it: sessions spread over the replicas and stick to them; a replica killed;
a rolling update to a new image while sessions draw; `docker stack rm` and deploy again. Each
checks the table against what the pages showed: every answer a page showed as saved is one row;
any other row is an answer given on a page whose replica stopped before it could say "Saved"
(only in the rolling update; at most one row each).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from lab import browser
from lab.browser import ACTION_TIMEOUT_MS, PlaywrightError
from lab.compose_project import ComposeProject, require_engine
from lab.swarm import SwarmStack, Task, docker, single_node_swarm

pytestmark = pytest.mark.docker

REPLICAS = 3
SESSIONS = 12
# The correction each even session gives (never the 7 it draws); odd ones press Correct.
LABELS = [0, 1, 2, 3, 4, 5, 6, 8, 9, 0, 1, 2]
SAVED = re.compile(r"Saved: you drew a (\d) \(model said (\d), (\d+\.\d)%\)\.")
STORED = re.compile(r"stored feedback id=\d+ \(predicted (\d), true label (\d)\)")

UPDATE_IMAGE = "{image}-update"  # the rolling update's image: the app's with one more label
Answer = tuple[int, int, float]  # predicted, true label, confidence in % (as shown, to 0.1)


@pytest.fixture(scope="module")
def stack() -> Iterator[SwarmStack]:
    require_engine()
    project = ComposeProject(prefix="mnistswarm")
    try:
        with single_node_swarm():
            stack = SwarmStack(project, project.name, REPLICAS)
            try:
                project.compose("build", "app", timeout=1200)
                stack.deploy()
                stack.wait_for_replicas(REPLICAS)
                yield stack
            finally:
                stack.remove()
    finally:
        project.remove()
        remove_image(UPDATE_IMAGE.format(image=project.image))


@dataclass
class Session:
    """One browser session: the answers its page showed as saved, those given but never shown
    saved (its replica stopped meanwhile), its WebSockets so far."""

    page: browser.AppPage
    answers: list[Answer] = field(default_factory=list)
    unconfirmed: list[Answer] = field(default_factory=list)
    sockets: int = 0
    settled: tuple[int, int] = (0, 0)  # the sockets and runs ended when the page last settled

    def __post_init__(self) -> None:
        self.page.page.on("websocket", self._opened)
        self.settled = (self.sockets, self.page.runs_finished)

    def _opened(self, _socket: object) -> None:
        self.sockets += 1

    def cookie(self) -> str:
        """Caddy's ``lb`` cookie ("" if none): which replica this browser sticks to."""
        return next((c["value"] for c in self.page.context.cookies() if c["name"] == "lb"), "")

    def answer(self, label: int | None = None, timeout_ms: float = ACTION_TIMEOUT_MS) -> Answer:
        """Draw a 7, then Correct (or a correction to *label*); what the page said it saved.
        Each step waits up to *timeout_ms* for the app's run."""
        page = self.page
        sockets, runs = self.settled
        if self.sockets != sockets:
            # The page reconnected (its replica went away): it reruns in full in a new session
            # and replaces its canvas. Draw on the new one, as a person would.
            page.wait_until_idle((0, runs), timeout_ms)
        page.draw_held(browser.DIGIT_STROKES[7])
        page.release()
        page.wait_until_idle(page.drawing_mark, timeout_ms)
        page.page.locator("h3", has_text="Prediction:").wait_for(timeout=5000)
        shown = page.prediction()
        given = (shown.digit, shown.digit if label is None else label, shown.confidence_percent)
        self.unconfirmed.append(given)  # until the page says it is saved
        mark = page.mark()
        if label is None:
            page.button("correct").click()
        else:
            page.type_true_label(str(label))
            page.button("submit_correction").click()
        page.wait_until_idle(mark, timeout_ms)
        alerts = page.alerts()
        saved = [SAVED.fullmatch(alert) for alert in alerts if alert.startswith("Saved")]
        assert len(saved) == 1 and saved[0], alerts
        true, predicted, percent = saved[0].groups()
        answer = (int(predicted), int(true), float(percent))
        assert answer == (shown.digit, shown.digit if label is None else label, answer[2])
        assert abs(answer[2] - shown.confidence_percent) < 1e-6, (answer, shown)
        self.answers.append(self.unconfirmed.pop())
        self.settled = (self.sockets, page.runs_finished)
        return answer


@pytest.fixture(scope="module")
def sessions(stack: SwarmStack, chromium) -> Iterator[list[Session]]:
    opened = []
    try:
        for _ in range(SESSIONS):
            opened.append(Session(browser.AppPage.open(chromium, stack.url)))
        yield opened
    finally:
        for session in opened:
            session.page.close()


def stored_rows(stack: SwarmStack) -> list[Answer]:
    out = stack.psql("SELECT predicted_digit, true_label, confidence FROM predictions ORDER BY id")
    rows = (line.split("|") for line in out.splitlines())
    return [(int(p), int(t), float(c) * 100) for p, t, c in rows]  # real: 99.99901 for 100.0%


def assert_rows_are_the_answers(stack: SwarmStack, sessions: list[Session]) -> int:
    """Every answer shown as saved is one row; every other row is an answer given but never
    shown saved (at most once each). Returns how many of those were stored."""
    rows = Counter((p, t, round(c, 1)) for p, t, c in stored_rows(stack))
    shown = Counter(answer for session in sessions for answer in session.answers)
    given = Counter(answer for session in sessions for answer in session.unconfirmed)
    assert not shown - rows, f"lost: {shown - rows}"
    assert not rows - shown - given, f"doubled or never shown: {rows - shown - given}"
    return (rows - shown).total()


def replicas_of(stack: SwarmStack, sessions: list[Session]) -> list[Task]:
    """The replica each session's cookie points at (all of them running)."""
    replicas = [stack.replica_of_cookie(session.cookie()) for session in sessions]
    assert None not in replicas, [session.cookie() for session in sessions]
    return replicas


def stored_in_logs(task: Task) -> Counter:
    return Counter(tuple(map(int, m)) for m in STORED.findall(SwarmStack.logs(task.container)))


def test_sessions_spread_over_replicas_stick_to_them_and_store_what_they_showed(
    stack: SwarmStack, sessions: list[Session]
) -> None:
    first = replicas_of(stack, sessions)
    for number, (session, label) in enumerate(zip(sessions, LABELS, strict=True)):
        session.answer(None if number % 2 else label)  # a correction or Correct
    assert replicas_of(stack, sessions) == first, "a session moved to another replica"
    assert assert_rows_are_the_answers(stack, sessions) == 0
    assert len(stored_rows(stack)) == SESSIONS
    # Each replica's log holds the answers of the sessions Caddy sent to it, and only those.
    hit = Counter(task.name for task in first)
    print(f"sessions per replica: {sorted(hit.values())}")
    assert len(hit) >= 2, hit
    for task in stack.tasks():
        expected = Counter(
            answer[:2] for session, at in zip(sessions, first, strict=True) if at == task
            for answer in session.answers
        )  # fmt: skip
        assert stored_in_logs(task) == expected, task.name


def test_a_killed_replica_s_sessions_come_back_on_another_and_lose_no_row(
    stack: SwarmStack, sessions: list[Session]
) -> None:
    before = replicas_of(stack, sessions)
    victim, _ = Counter(before).most_common(1)[0]
    moved = [session for session, task in zip(sessions, before, strict=True) if task == victim]
    sockets = [session.sockets for session in moved]
    docker("kill", victim.container)
    started = time.monotonic()
    for session, count in zip(moved, sockets, strict=True):
        # The page notices the closed WebSocket and opens a new one, through Caddy.
        while session.sockets == count:
            assert time.monotonic() - started < 60, "the page did not reconnect"
            session.page.page.wait_for_timeout(100)
    print(f"{len(moved)} sessions reconnected {time.monotonic() - started:.1f} s after the kill")
    for session in moved:
        session.answer()
    after = replicas_of(stack, sessions)
    for was, now in zip(before, after, strict=True):
        assert (now != victim) if was == victim else (now == was), (was, now)
    assert assert_rows_are_the_answers(stack, sessions) == 0
    assert len(stored_rows(stack)) == SESSIONS + len(moved)
    stack.wait_for_replicas(REPLICAS)  # the swarm replaces the killed task


class PageLoads(threading.Thread):
    """New visitors while the update runs: GET / and the health endpoint without a cookie,
    every 100 ms; the status of each."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.statuses, self.done = url, Counter(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for path in ("/", "/_stcore/health"):
                try:
                    with urllib.request.urlopen(self.url + path, timeout=10) as response:
                        self.statuses[response.status] += 1
                except urllib.error.HTTPError as exc:
                    self.statuses[exc.code] += 1
                except OSError as exc:
                    self.statuses[type(exc).__name__] += 1
            time.sleep(0.1)


def test_a_rolling_update_while_sessions_draw_fails_no_save_and_no_page_load(
    stack: SwarmStack, sessions: list[Session]
) -> None:
    old = stack.project.image
    new = UPDATE_IMAGE.format(image=old)
    subprocess.run(
        ["docker", "build", "-t", new, "-"], input=f"FROM {old}\nLABEL update=1\n",
        text=True, capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    loads = PageLoads(stack.url)
    loads.start()
    result: list[str | BaseException] = []
    update = threading.Thread(
        target=lambda: result.append(_deploy_or_error(stack, f"APP_IMAGE={new}"))
    )
    update.start()
    cycles = interrupted = 0
    while update.is_alive():
        for session in sessions:
            sockets = session.sockets
            try:
                session.answer(timeout_ms=20_000)
                cycles += 1
            except (TimeoutError, AssertionError, PlaywrightError):
                # Only a page whose replica stopped mid-answer may lose that drawing (the
                # new replica starts a new session); a save it showed failing never passes.
                if session.sockets == sockets or "not saved" in str(session.page.alerts()):
                    raise
                interrupted += 1
            if not update.is_alive():
                break
    loads.done.set()
    loads.join()
    assert not isinstance(result[0], BaseException), result[0]
    print(f"update: {cycles} answers saved, {interrupted} interrupted; loads {loads.statuses}")
    assert set(loads.statuses) == {200}, loads.statuses
    images = {docker("inspect", "--format", "{{.Config.Image}}", t.container)
              for t in stack.wait_for_replicas(REPLICAS)}  # fmt: skip
    assert images == {new}, images
    assert cycles > 0
    stored_unconfirmed = assert_rows_are_the_answers(stack, sessions)
    print(f"interrupted answers stored all the same: {stored_unconfirmed} of {interrupted}")


def remove_image(image: str) -> None:
    """Once the containers of the swarm's tasks are gone (they go in the background)."""
    for _ in range(60):
        docker("image", "rm", image, check=False)
        if docker("image", "ls", "--quiet", image) == "":
            return
        time.sleep(1)
    raise AssertionError(f"{image}: still there")


def _deploy_or_error(stack: SwarmStack, *env: str) -> str | BaseException:
    try:
        return stack.deploy(*env)
    except BaseException as exc:  # reported by the test, in its thread
        return exc


def test_the_data_survives_stack_rm_and_a_new_deploy(
    stack: SwarmStack, sessions: list[Session], chromium
) -> None:
    """The last drill: the stack goes down and comes back (the sessions' pages are gone)."""
    rows = stored_rows(stack)
    assert rows
    stack.stop()
    assert f"{stack.name}_pgdata" in docker("volume", "ls", "--quiet").split()
    stack.deploy()
    stack.wait_for_replicas(REPLICAS)
    assert stored_rows(stack) == rows
    session = Session(browser.AppPage.open(chromium, stack.url))
    with session.page:
        (answer,) = [session.answer()]
    after = stored_rows(stack)
    assert after[: len(rows)] == rows and len(after) == len(rows) + 1
    assert after[-1][:2] == answer[:2]
