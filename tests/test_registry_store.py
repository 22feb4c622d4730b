"""registry/store.py: the app's role may only read the versions; the History page's table of
the versions that were live (through the app, AppTest).
"""

from __future__ import annotations

import json

import psycopg
import pytest
import streamlit as st
from conftest import ROOT
from psycopg.conninfo import make_conninfo
from registry_fixtures import APP_PASSWORD, SHIPPED, honest_sets, sha, write
from streamlit.testing.v1 import AppTest

import db
from registry import promotion, store


def test_app_role_may_only_read_the_versions(server, live_file):
    with server.connect() as conn:
        store.ensure_live(conn, live_file)
    app_url = make_conninfo(server.url, user=db.APP_ROLE, password=APP_PASSWORD)
    with psycopg.connect(app_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM model_versions").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM model_shadow").fetchone() == (0,)
        for statement in (
            "INSERT INTO model_promotions (sha256, action) SELECT sha256, 'promote'"
            " FROM model_versions",
            "UPDATE model_versions SET info = '{}'",
            "DELETE FROM model_promotions",
            "INSERT INTO model_shadow (sha256) VALUES (NULL)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_history_shows_each_version_when_live_its_figures_and_its_answers(
    server, live_file, vandal_candidates, drill, monkeypatch
):
    vandal = vandal_candidates["sevens"][0]
    write(live_file, vandal)
    info = json.loads(SHIPPED.with_suffix(".json").read_text())
    shipped = promotion.promote(
        SHIPPED, info, honest_sets(drill), conninfo=server.url, out=live_file
    )
    names = store.version_name(shipped.candidate_sha256), store.version_name(sha(vandal))
    with server.connect() as conn:  # 2 of 3 answers right by the shipped model, 0 of 1 before
        answers = [(7, 1, names[1]), (7, 7, names[0]), (1, 1, names[0]), (4, 9, names[0])]
        for predicted, true, name in answers:
            conn.execute(
                "INSERT INTO predictions (predicted_digit, true_label, confidence, model)"
                " VALUES (%s, %s, 0.9, %s)",
                (predicted, true, name),
            )
    monkeypatch.setenv("DATABASE_URL", server.url)
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    at.switch_page("ui/history.py").run()
    assert not at.exception

    table = next(frame.value for frame in at.dataframe if "version" in frame.value.columns)
    assert list(table["version"]) == list(names)
    assert list(table["how"]) == ["promote", "initial"]
    assert table["live"][0].endswith("(live)") and " to " in table["live"][1]
    report = table["figures at promotion"][0]
    assert report.startswith(f"{promotion.PRIMARY} ") and "; MNIST test " in report
    assert table["figures at promotion"][1] == "-"  # made live as the first version
    shipped = json.loads(SHIPPED.with_suffix(".json").read_text())  # model.json's figures
    assert f"MNIST test {shipped['test_accuracy']:.2%}" in table["figures from training"][0]
    assert list(table["answers"]) == [3, 1]
    assert list(table["accuracy of its answers"]) == pytest.approx([200 / 3, 0.0])
    st.cache_resource.clear()
