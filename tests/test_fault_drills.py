"""Fault drills with real processes: bad images, and (marked ``browser``) the database failing
under a real ``streamlit run`` app, and 8 users at once.

Each drill prints what it did (run pytest with ``-s`` to see it).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

import model

ROOT = Path(__file__).resolve().parent.parent


# --- bad input to preprocess: an answer or a clear error, never a crash or a hang ----------------

# Run in a child process: a crash (segfault, abort, out of memory) or a hang in one case is seen
# as such, and named (the case is printed before it runs).
_BAD_INPUT_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import torch
    from PIL import Image, ImageDraw
    import model, utils

    torch.set_num_threads(1)
    classifier = model.load_model()

    def drawing(size, mode="RGBA"):
        image = Image.new(mode, (size, size), "black")
        pen = ImageDraw.Draw(image)
        points = [(0.25, 0.18), (0.75, 0.18), (0.43, 0.86)]
        points = [(x * size, y * size) for x, y in points]
        pen.line(points, fill="white", width=max(2, size // 15))
        return image

    rng = np.random.default_rng(0)
    noise = lambda shape: rng.integers(0, 256, shape, dtype=np.uint8)
    black, white = np.zeros((280, 280), np.uint8), np.full((280, 280), 255, np.uint8)
    seven = np.asarray(drawing(280))
    big_seven = np.asarray(drawing(5000))
    transparent_big = np.zeros((5000, 5000, 4), np.uint8)
    transparent_big[..., 3] = np.asarray(drawing(5000, "L"))
    line = np.zeros((3, 5000), np.uint8)
    line[1, 500:4500] = 255
    cases = {
        "1x1 grey": lambda: np.zeros((1, 1), np.uint8),
        "1x1 white RGBA": lambda: np.full((1, 1, 4), 255, np.uint8),
        "0x280": lambda: np.zeros((0, 280), np.uint8),
        "280x280 all white RGB": lambda: np.full((280, 280, 3), 255, np.uint8),
        "280x280 all black": lambda: np.zeros((280, 280), np.uint8),
        "280x280 all black RGBA, opaque": lambda: np.dstack([black, black, black, white]),
        "280x280 RGBA, fully transparent": lambda: np.zeros((280, 280, 4), np.uint8),
        "280x280 random noise RGB": lambda: noise((280, 280, 3)),
        "280x280 random noise RGBA": lambda: noise((280, 280, 4)),
        "280x280 drawing of a 7": lambda: seven,
        "5000x5000 drawing of a 7": lambda: big_seven,
        "5000x5000 transparent drawing of a 7": lambda: transparent_big,
        "5000x5000 all white RGBA": lambda: np.full((5000, 5000, 4), 255, np.uint8),
        "5000x5000 all black": lambda: np.zeros((5000, 5000), np.uint8),
        "5000x5000 random noise grey": lambda: noise((5000, 5000)),
        "5000x5000 random noise RGBA": lambda: noise((5000, 5000, 4)),
        "3x5000 line": lambda: line,
        "5000x3 line": lambda: np.ascontiguousarray(line.T),
        "1x5000 white": lambda: np.full((1, 5000), 255, np.uint8),
        "reversed view (negative strides)": lambda: seven[::-1, ::-1],
        "Fortran-ordered": lambda: np.asfortranarray(seven),
        "every other pixel (strided view)": lambda: seven[::2, ::2],
        "float32 in [0, 1]": lambda: seven.astype(np.float32) / 255,
        "float64 0-255": lambda: seven.astype(np.float64),
        "float32 NaN": lambda: np.full((280, 280), np.nan, np.float32),
        "uint16": lambda: seven.astype(np.uint16) * 257,
        "int64": lambda: seven.astype(np.int64),
        "int8": lambda: (seven // 2).astype(np.int8),
        "bool": lambda: seven[..., 0] > 0,
        "2-channel (grey + alpha)": lambda: np.dstack([seven[..., 0], seven[..., 3]]),
        "5-channel": lambda: np.zeros((280, 280, 5), np.uint8),
        "4-D batch": lambda: seven[None],
        "1-D": lambda: np.zeros(280, np.uint8),
        "0-D": lambda: np.uint8(7),
        "nested list": lambda: seven.tolist(),
        "bytes": lambda: b"\\x89PNG",
        "None": lambda: None,
        "PIL LA (grey + alpha)": lambda: drawing(280, "LA"),
        "PIL I;16": lambda: drawing(280, "L").convert("I;16"),
        "PIL F": lambda: drawing(280, "L").convert("F"),
        "PIL CMYK": lambda: drawing(280, "RGB").convert("CMYK"),
        "PIL P (palette)": lambda: drawing(280, "RGB").convert("P"),
        "PIL 1 (bilevel)": lambda: drawing(280, "1"),
    }
    for name, make in cases.items():
        image = make()
        print(json.dumps({"case": name, "start": True}), flush=True)
        start = time.perf_counter()
        try:
            batch = utils.preprocess(image)
            prediction = model.predict(classifier, batch)
            outcome = {"outcome": "prediction", "digit": prediction.digit,
                       "finite": bool(torch.isfinite(batch).all()), "shape": list(batch.shape)}
        except Exception as exc:
            outcome = {"outcome": type(exc).__name__, "message": str(exc)}
        outcome.update(case=name, seconds=time.perf_counter() - start)
        print(json.dumps(outcome), flush=True)
    """
)

EMPTY, FORMAT, PREDICTION = "EmptyImageError", "ImageFormatError", "prediction"
ANY_ANSWER = {EMPTY, PREDICTION}
EXPECTED_OUTCOMES = {
    "1x1 grey": {EMPTY},
    "1x1 white RGBA": {EMPTY},
    "0x280": {EMPTY},
    "280x280 all white RGB": {EMPTY},
    "280x280 all black": {EMPTY},
    "280x280 all black RGBA, opaque": {EMPTY},
    "280x280 RGBA, fully transparent": {EMPTY},
    "280x280 random noise RGB": ANY_ANSWER,
    "280x280 random noise RGBA": ANY_ANSWER,
    "280x280 drawing of a 7": {PREDICTION},
    "5000x5000 drawing of a 7": {PREDICTION},
    "5000x5000 transparent drawing of a 7": {PREDICTION},
    "5000x5000 all white RGBA": {EMPTY},
    "5000x5000 all black": {EMPTY},
    "5000x5000 random noise grey": ANY_ANSWER,
    "5000x5000 random noise RGBA": ANY_ANSWER,
    "3x5000 line": ANY_ANSWER,
    "5000x3 line": ANY_ANSWER,
    "1x5000 white": {EMPTY},
    "reversed view (negative strides)": {PREDICTION},
    "Fortran-ordered": {PREDICTION},
    "every other pixel (strided view)": {PREDICTION},
    "float32 in [0, 1]": {FORMAT},
    "float64 0-255": {FORMAT},
    "float32 NaN": {FORMAT},
    "uint16": {FORMAT},
    "int64": {FORMAT},
    "int8": {FORMAT},
    "bool": {FORMAT},
    "2-channel (grey + alpha)": {FORMAT},
    "5-channel": {FORMAT},
    "4-D batch": {FORMAT},
    "1-D": {FORMAT},
    "0-D": {FORMAT},
    "nested list": {FORMAT},
    "bytes": {FORMAT},
    "None": {FORMAT},
    "PIL LA (grey + alpha)": {PREDICTION},
    "PIL I;16": {PREDICTION},
    "PIL F": {PREDICTION},
    "PIL CMYK": {PREDICTION},
    "PIL P (palette)": {PREDICTION},
    "PIL 1 (bilevel)": {PREDICTION},
}
CASE_TIMEOUT_S = 20  # the slowest case (5000x5000 RGBA) takes ~0.5 s on 2 idle cores


def test_bad_images_give_an_answer_or_a_clear_error_never_a_crash_or_hang(tmp_path):
    log = tmp_path / "bad-input.jsonl"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", _BAD_INPUT_WORKER],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + 60 + CASE_TIMEOUT_S * len(EXPECTED_OUTCOMES)
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        hung = process.poll() is None
        if hung:
            process.kill()
        _, stderr = process.communicate(timeout=30)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    started = [r["case"] for r in records if r.get("start")]
    results = {r["case"]: r for r in records if not r.get("start")}
    unfinished = [case for case in started if case not in results]
    assert not hung, f"hung on {unfinished}"
    assert process.returncode == 0, (
        f"crashed (exit {process.returncode}) on {unfinished}:\n{stderr}"
    )
    assert list(results) == list(EXPECTED_OUTCOMES)

    print("\nbad input to utils.preprocess + model.predict:")
    for case, result in results.items():
        detail = result.get("message") or f"digit {result.get('digit')}"
        print(f"  {case:40} {result['seconds'] * 1000:8.1f} ms  {result['outcome']}: {detail}")
    problems = []
    for case, expected in EXPECTED_OUTCOMES.items():
        result = results[case]
        if result["outcome"] not in expected:
            problems.append(f"{case}: {result['outcome']} {result.get('message', '')}")
        elif result["outcome"] == PREDICTION:
            if not (result["finite"] and result["shape"] == [1, 1, 28, 28]):
                problems.append(f"{case}: model input {result}")
        elif len(result["message"]) < 10:
            problems.append(f"{case}: unclear message {result['message']!r}")
        if result["seconds"] > CASE_TIMEOUT_S:
            problems.append(f"{case}: took {result['seconds']:.1f} s")
    assert not problems, "\n".join(problems)
    # Size does not change what the model sees: the 5000x5000 drawing reads as the 280x280 one.
    small, big = results["280x280 drawing of a 7"], results["5000x5000 drawing of a 7"]
    assert (
        big["digit"] == small["digit"] == results["5000x5000 transparent drawing of a 7"]["digit"]
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims *width* x *height* pixels (its data is one pixel's): what a client can
    send as the canvas's data URL."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])  # IHDR: size, then flags
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@pytest.mark.parametrize(
    "png",
    [
        b"not a png",
        png_header(1, 1)[:40],
        png_header(20_000, 20_000),  # over Pillow's decompression-bomb limit
        png_header(12_000, 12_000),  # a header alone: a truncated image
    ],
    ids=["garbage", "truncated", "over-pillow-bomb-limit", "huge-header-no-data"],
)
def test_an_unreadable_drawing_gives_a_hint_not_an_exception(png):
    import app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        analysis = app.analyse(png, "digest", model.DigitCNN().eval())
    assert analysis.prediction is None and analysis.hint
