"""A drawing session without a browser: Streamlit's own WebSocket protocol, spoken with its
protobuf classes (``BackMsg`` out, ``ForwardMsg`` in), to load the app with many people at once
while the browsers' own work stays off the machine's cores (lab.bench capacity).

A session sends what the page sends (read off a real Chromium page's frames): the script's first
run, a drawing as the canvas component's JSON value (fabric.js paths and the PNG) in a rerun of the
drawing area's fragment, and **Correct** as a trigger in the next. It does not draw anything: the
time from sending a drawing to the message that shows its prediction is the app's part of the
latency a person sees, without the canvas's 200 ms debounce or the page's rendering.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import urllib.request
from collections.abc import Sequence
from urllib.parse import urlsplit

from PIL import Image, ImageDraw

import utils

Stroke = Sequence[tuple[float, float]]


def drawing_value(strokes: Sequence[Stroke]) -> str:
    """The canvas component's value for *strokes* (canvas pixels), as the page sends it."""
    from lab.browser import fabric_path

    image = Image.new("RGBA", (utils.CANVAS_SIZE,) * 2, (0, 0, 0, 255))
    for stroke in strokes:
        ImageDraw.Draw(image).line(stroke, fill="white", width=utils.BRUSH_WIDTH, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    raw = {"version": "7.4.0", "objects": [fabric_path(stroke) for stroke in strokes]}
    return json.dumps({"drawing": {"raw": raw, "data": png}})


class Session:
    """One person's session of the app at *url*: ``await open()``, then ``draw`` and
    ``correct``, each returning when the run it started has finished."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url, self.origin = f"ws://{parts.netloc}/_stcore/stream", f"http://{parts.netloc}"
        self.widgets: dict[str, str] = {}  # the key a widget was given -> its current id
        self.page_hash, self.fragment = "", ""
        self.prediction: str | None = None
        self.prediction_at = 0.0  # time.perf_counter() when the prediction's message came
        self.media: list[str] = []  # images the last run showed, which a browser then fetches

    async def open(self) -> Session:
        from websockets.asyncio.client import connect

        self.socket = await connect(
            self.url, subprotocols=["streamlit"], origin=self.origin, max_size=2**24
        )
        await self._run(fragment="", widgets={})
        return self

    async def close(self) -> None:
        await self.socket.close()

    async def draw(self, strokes: Sequence[Stroke]) -> float:
        """Send a drawing; the seconds from sending it to its prediction's message."""
        self.prediction = None
        widgets = {
            "true_label": ("string_value", ""),
            "canvas": ("json_value", drawing_value(strokes)),
        }
        sent = time.perf_counter()
        await self._run(self.fragment, widgets)
        if self.prediction is None:
            raise RuntimeError("the drawing's run ended without a prediction")
        return self.prediction_at - sent

    async def correct(self) -> None:
        canvas = self.widgets["canvas"]
        widgets = {"true_label": ("string_value", ""), "correct": ("trigger_value", True)}
        await self._run(self.fragment, widgets)
        if self.widgets["canvas"] == canvas:
            raise RuntimeError("Correct did not clear the canvas")

    async def _run(self, fragment: str, widgets: dict[str, tuple[str, object]]) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg

        message = BackMsg()
        state = message.rerun_script
        state.page_script_hash, state.fragment_id = self.page_hash, fragment
        state.context_info.url = self.origin + "/"
        for key, (field, value) in widgets.items():
            widget = state.widget_states.widgets.add()
            widget.id = self.widgets[key]
            setattr(widget, field, value)
        self.media = []
        await self.socket.send(message.SerializeToString())
        await self._receive_run()
        await asyncio.gather(*(asyncio.to_thread(self._fetch, path) for path in self.media))

    def _fetch(self, path: str) -> None:
        with urllib.request.urlopen(self.origin + path, timeout=60) as response:
            response.read()

    async def _receive_run(self) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        while True:
            received = ForwardMsg.FromString(await self.socket.recv())
            kind = received.WhichOneof("type")
            if kind == "new_session":
                self.page_hash = received.new_session.page_script_hash
            elif kind == "delta":
                self._element(received.delta)
            elif kind == "script_finished" and (
                received.script_finished != ForwardMsg.FINISHED_EARLY_FOR_RERUN
            ):
                return

    def _element(self, delta) -> None:
        if delta.WhichOneof("type") != "new_element":
            return
        element = delta.new_element
        body = getattr(element, element.WhichOneof("type"))
        widget_id = getattr(body, "id", "")
        for key in ("canvas", "true_label", "correct"):
            if f"-{key}-" in widget_id:
                self.widgets[key] = widget_id
                self.fragment = delta.fragment_id
        if element.WhichOneof("type") == "imgs":
            self.media += [image.url for image in element.imgs.imgs]
        if element.WhichOneof("type") == "heading" and "Prediction:" in element.heading.body:
            self.prediction, self.prediction_at = element.heading.body, time.perf_counter()


async def draw_all(sessions: Sequence[Session], strokes: Sequence[Stroke]) -> list[float]:
    """All *sessions* send *strokes* at once; each one's seconds from sending to its
    prediction's message."""
    return list(await asyncio.gather(*(session.draw(strokes) for session in sessions)))


async def correct_all(sessions: Sequence[Session]) -> None:
    await asyncio.gather(*(session.correct() for session in sessions))
