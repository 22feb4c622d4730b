"""registry/live.py: an app process serves the live version and follows it (a promotion, a
rollback, an ensemble), keeps its model while the database is down or new weights are corrupt,
and a running app (AppTest) serves a newly live version within 30 s without a restart; it follows
the version in shadow the same way.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import streamlit as st
import torch
from conftest import ROOT, wait_for
from registry_fixtures import SHIPPED, sha
from streamlit.testing.v1 import AppTest
from test_app import STROKES, click, draw, drawing_png

import db
import model as model_lib
import registry.live as registry_live
import ui.session
from registry import store
from registry.live import LiveModel


@pytest.fixture
def registry(server, live_file, vandal_candidates) -> dict[str, str]:
    """The shipped model live (initial), the sevens vandal's candidate a version; db pointed at
    the server. Hashes by name."""
    vandal = vandal_candidates["sevens"][0]
    with server.connect() as conn:
        shipped = store.ensure_live(conn, live_file)
        vandal_sha = store.register(conn, vandal, {"sources": ["feedback"]})
    db.configure(server.url)
    return {"shipped": shipped, "vandal": vandal_sha}


def file_model(path: Path = SHIPPED):
    return lambda: (model_lib.load_model(path), "file")


@pytest.fixture
def live_model():
    """A LiveModel that looks every 0.2 s, closed after the test (its thread stops)."""
    made = []

    def make() -> LiveModel:
        made.append(LiveModel(file_model(), check_s=0.2))
        return made[-1]

    yield make
    for live in made:
        live.close()


def test_live_model_serves_the_file_until_a_version_is_live_then_follows_it(
    server, live_file, vandal_candidates, live_model
):
    db.configure(server.url)
    live = live_model()
    assert live.get()[1] == "file"  # empty registry
    with server.connect() as conn:
        shipped = store.ensure_live(conn, live_file)
        store.register(conn, vandal_candidates["sevens"][0], {})
    assert wait_for(lambda: live.get()[1] == store.version_name(shipped))
    vandal = sha(vandal_candidates["sevens"][0])
    store.rollback(vandal[:6], conninfo=server.url, out=None)
    assert wait_for(lambda: live.get()[1] == store.version_name(vandal))
    served = live.get()[0].state_dict()
    expected = store.load_weights(vandal_candidates["sevens"][0]).state_dict()
    assert all(torch.equal(served[name], expected[name]) for name in expected)


def test_live_model_keeps_its_model_while_the_database_is_down(
    registry, server, caplog, live_model
):
    live = live_model()
    serving = live.get()
    assert serving[1] == store.version_name(registry["shipped"])
    server.stop()
    time.sleep(0.5)
    for _ in range(5):
        assert live.get() is serving  # never raises, never falls back to the file
        time.sleep(0.2)
    assert wait_for(lambda: "kept the model" in caplog.text and "unreachable" in caplog.text)
    server.start()
    store.rollback(registry["vandal"][:8], conninfo=server.url, out=None)
    assert wait_for(lambda: live.get()[1] == store.version_name(registry["vandal"]))


def test_live_model_follows_a_version_that_is_an_ensemble(server, live_file, live_model):
    """A K-member model (model.DigitCNN(members=K)) is a version like any other: registered,
    made live, served by every app process."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(model_lib.DigitCNN(members=3).eval().state_dict(), buffer)
    ensemble = buffer.getvalue()
    db.configure(server.url)
    with server.connect() as conn:
        store.ensure_live(conn, live_file)
        store.register(conn, ensemble, {"members": 3})
    store.rollback(sha(ensemble)[:8], conninfo=server.url, out=None)
    live = live_model()
    assert wait_for(lambda: live.get()[1] == store.version_name(sha(ensemble)))
    assert len(live.get()[0].members) == 3


@pytest.mark.parametrize("damage", ["not a model", "not its hash"])
def test_live_model_keeps_its_model_when_the_new_weights_are_corrupt(
    registry, server, caplog, damage, live_model
):
    live = live_model()
    serving = live.get()
    with server.connect() as conn:
        if damage == "not a model":
            bad = store.register(conn, b"PK\x03\x04 not a state_dict", {})
        else:
            bad = registry["vandal"]
            conn.execute(
                "UPDATE model_versions SET weights = 'x' || weights WHERE sha256 = %s", (bad,)
            )
        conn.execute(
            "INSERT INTO model_promotions (sha256, action) VALUES (%s, 'rollback')", (bad,)
        )
    expected = "corrupt or not a state_dict" if damage == "not a model" else "do not match"
    assert wait_for(lambda: live.get() is serving and expected in caplog.text)  # get() checks
    assert f"kept the model {serving[1]}" in caplog.text


def test_live_model_follows_the_shadow_version_and_keeps_it_while_the_database_is_down(
    registry, server, vandal_candidates, live_model
):
    live = live_model()
    serving = live.get()
    assert live.shadow() is None
    store.set_shadow(registry["vandal"][:8], conninfo=server.url)
    vandal_name = store.version_name(registry["vandal"])
    assert wait_for(lambda: live.shadow() is not None)
    shadow = live.shadow()
    assert shadow[1] == vandal_name and live.get() is serving  # the live model stays
    served = shadow[0].state_dict()
    expected = store.load_weights(vandal_candidates["sevens"][0]).state_dict()
    assert all(torch.equal(served[name], expected[name]) for name in expected)

    server.stop()
    time.sleep(0.5)  # two checks
    assert live.shadow() is shadow
    server.start()
    store.set_shadow(None, conninfo=server.url)
    assert wait_for(lambda: live.shadow() is None)
    # A shadow that goes live is no shadow: the live model is not compared with itself.
    store.set_shadow(registry["vandal"][:8], conninfo=server.url)
    assert wait_for(lambda: live.shadow() is not None)
    store.rollback(registry["vandal"][:8], conninfo=server.url, out=None)
    assert wait_for(lambda: live.get()[1] == vandal_name and live.shadow() is None)


def test_live_model_follows_the_live_version_in_a_database_migrated_before_shadows(
    server, live_file, live_model
):
    """An app upgraded before `python db.py migrate` ran: no model_shadow table, no shadow, the
    live version followed as before."""
    with server.connect() as conn:
        shipped = store.ensure_live(conn, live_file)
        conn.execute("DROP TABLE model_shadow")
    db.configure(server.url)
    live = live_model()
    assert live.get()[1] == store.version_name(shipped) and live.shadow() is None


def test_live_model_runs_no_shadow_whose_weights_are_unusable_and_says_so_once(
    registry, server, caplog, live_model, monkeypatch
):
    loaded = []
    real = registry_live.load_weights
    monkeypatch.setattr(
        registry_live, "load_weights", lambda w, *a: loaded.append(w) or real(w, *a)
    )
    live = live_model()
    serving = live.get()
    with server.connect() as conn:
        bad = store.register(conn, b"PK\x03\x04 not a state_dict", {})
        conn.execute("INSERT INTO model_shadow (sha256) VALUES (%s)", (bad,))
    assert wait_for(lambda: "no shadow model: " in caplog.text)
    time.sleep(0.5)  # more checks: not read again, not logged again
    assert caplog.text.count("no shadow model: ") == 1
    assert loaded.count(b"PK\x03\x04 not a state_dict") == 1
    assert "corrupt or not a state_dict" in caplog.text
    assert live.shadow() is None and live.get() is serving
    store.set_shadow(registry["vandal"][:8], conninfo=server.url)  # a usable one is followed
    assert wait_for(lambda: live.shadow() is not None)


def seven(shift: int) -> bytes:
    """The same 7 drawn *shift* pixels to the right: a new drawing, read alike."""
    return drawing_png([[(x + shift, y) for x, y in stroke] for stroke in STROKES[7]])


def test_a_running_app_serves_a_promoted_model_within_30_s_without_a_restart(
    registry, server, tmp_path, monkeypatch
):
    """The app as it runs (AppTest, the default 10 s check): a 7 drawn before the change is read
    by the shipped model; after the vandal's version is made live, within 30 s, the same 7 is
    read by it, and the answer stored names it."""
    monkeypatch.setenv("DATABASE_URL", server.url)
    monkeypatch.setenv("MODEL_PATH", str(SHIPPED))
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    shipped_name = store.version_name(registry["shipped"])
    before = draw(at, seven(0)).session_state[ui.session.ANALYSIS]
    assert (before.model_name, before.prediction.digit) == (shipped_name, 7)

    store.rollback(registry["vandal"][:10], conninfo=server.url, out=None)
    changed = time.monotonic()
    vandal_name = store.version_name(registry["vandal"])
    shift = 0
    while at.session_state[ui.session.ANALYSIS].model_name != vandal_name:
        assert time.monotonic() - changed < 30, "the app still serves the old model"
        time.sleep(1)
        shift = 1 - shift  # another drawing: a new prediction
        draw(at, seven(shift))
    after = draw(at, seven(0)).session_state[ui.session.ANALYSIS]
    assert after.model_name == vandal_name
    assert after.prediction.probabilities != before.prediction.probabilities
    click(at, ui.session.CORRECT_BUTTON)
    with server.connect() as conn:
        stored = conn.execute("SELECT predicted_digit, model FROM predictions").fetchall()
    assert stored == [(after.prediction.digit, vandal_name)]
    st.cache_resource.clear()
