"""db.py against real PostgreSQL servers (lab.postgres, see conftest.py); nothing is mocked."""

from __future__ import annotations

import base64
import csv
import io
import logging
import math
import random
import re
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

import db
from lab import free_port
from lab.postgres import PostgresProcess, TcpProxy

INJECTION = "x'); DROP TABLE predictions; --"
MODEL_A, MODEL_B = "model.pth@aaaaaaaaaaaa", "model.pth@bbbbbbbbbbbb"


def rows(server: PostgresProcess, columns: str = "predicted_digit, true_label") -> list[tuple]:
    with server.connect() as conn:
        return conn.execute(f"SELECT {columns} FROM predictions ORDER BY id").fetchall()


def run_at_once(count: int, call) -> list[tuple[float, object]]:
    """Run call(n) in *count* threads released together: (seconds taken, result or error)."""
    barrier = threading.Barrier(count)
    outcomes: list[tuple[float, object]] = [(0.0, None)] * count

    def worker(n: int) -> None:
        barrier.wait()
        start = time.monotonic()
        try:
            result: object = call(n)
        except Exception as exc:  # reported by the caller
            result = exc
        outcomes[n] = (time.monotonic() - start, result)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


# --- the schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "error"),
    [((p, 1, 0.5, None), errors.CheckViolation) for p in (10, -1)]
    + [((1, t, 0.5, None), errors.CheckViolation) for t in (10, -1)]
    + [((1, 1, c, None), errors.CheckViolation) for c in (1.5, -0.1, "NaN")]
    + [((1, 1, 0.5, m), errors.CheckViolation) for m in ("", "x" * 101)]
    + [((1, None, 0.5, None), errors.NotNullViolation)],
    ids=lambda value: ascii(value)[:24] if isinstance(value, tuple) else value.__name__,
)
def test_the_table_refuses_values_out_of_range(clean_db, values, error):
    """The last line of defence, for writers other than db.log_prediction."""
    with pytest.raises(error), clean_db.connect() as conn:
        conn.execute(
            "INSERT INTO predictions (predicted_digit, true_label, confidence, model)"
            " VALUES (%s, %s, %s, %s)",
            values,
        )
    assert rows(clean_db) == []


SHADOW = "shadow_model, shadow_digit, shadow_confidence"


@pytest.mark.parametrize(
    "shadow",
    [(MODEL_B, d, 0.5) for d in (10, -1)]
    + [(MODEL_B, 1, c) for c in (1.5, -0.1, "NaN")]
    + [(m, 1, 0.5) for m in ("", "x" * 101)]
    + [(MODEL_B, None, None), (None, 1, None), (None, None, 0.5), (MODEL_B, 1, None)],
    ids=lambda value: ascii(value)[:24],
)
def test_the_shadow_columns_refuse_what_the_live_ones_refuse_and_go_together(clean_db, shadow):
    """The same CHECKs as the live answer's, and the shadow's name, digit and confidence are all
    there or none is."""
    with pytest.raises(errors.CheckViolation), clean_db.connect() as conn:
        conn.execute(
            "INSERT INTO predictions (predicted_digit, true_label, confidence, model,"
            f" {SHADOW}) VALUES (1, 1, 0.5, %s, %s, %s, %s)",
            (MODEL_A, *shadow),
        )
    assert rows(clean_db) == []


# The table as earlier versions created it: before submission_id, and before the model column.
OLD_TABLE = """CREATE TABLE predictions (id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    predicted_digit smallint NOT NULL CHECK (predicted_digit BETWEEN 0 AND 9),
    true_label smallint NOT NULL CHECK (true_label BETWEEN 0 AND 9),
    confidence real NOT NULL CHECK (confidence BETWEEN 0 AND 1)"""


@pytest.mark.parametrize("old_table", [OLD_TABLE + ")", OLD_TABLE + ", submission_id uuid UNIQUE)"])
def test_init_db_upgrades_an_old_table_and_keeps_every_row(pg_server, old_table):
    columns = "id, created_at, predicted_digit, true_label, confidence"
    with pg_server.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS drawings, predictions")
        conn.execute(old_table)
        conn.execute(
            "INSERT INTO predictions (created_at, predicted_digit, true_label, confidence)"
            " SELECT now() - n * interval '1 minute', n % 10, n * 3 % 10, n % 101 / 100.0"
            " FROM generate_series(1, 1000) AS n"
        )
        before = conn.execute(f"SELECT {columns} FROM predictions ORDER BY id").fetchall()
    db.configure(pg_server.url)
    db.init_db()
    db.init_db()  # idempotent
    sid = uuid.uuid4()
    shadow = {"shadow_model": MODEL_B, "shadow_digit": 7, "shadow_confidence": 0.25}
    new_id = db.log_prediction(
        1, 1, 0.9, submission_id=sid, model=MODEL_A, drawing=a_drawing(), **shadow
    )
    assert db.log_prediction(1, 1, 0.9, submission_id=sid, model=MODEL_A) == new_id
    after = rows(pg_server, f"{columns}, submission_id, model, {SHADOW}")
    assert [row[:5] for row in after[:-1]] == before
    assert [row[5:] for row in after] == [(None,) * 5] * 1000 + [(sid, MODEL_A, MODEL_B, 7, 0.25)]
    # The old answers stay valid without a drawing, and History counts them all.
    assert [row[0] for row in drawing_rows(pg_server)] == [sid]
    assert db.count_predictions() == 1001
    assert sum(entry["answers"] for entry in db.models_answering()) == 1001


# --- storing answers ----------------------------------------------------------------------------


def test_rows_round_trip_newest_first_and_each_insert_logs_its_duration(clean_db, caplog):
    caplog.set_level(logging.INFO, logger="db")
    before = datetime.now(UTC)
    ids = [db.log_prediction(3, 3, 0.25), db.log_prediction(7, 1, 1, model=MODEL_A)]
    ids.append(db.log_prediction(0, 9, 0))
    newest = db.recent_predictions()
    assert [tuple(row.values()) for row in newest] == [
        (ids[2], newest[0]["created_at"], 0, 9, 0.0, None),
        (ids[1], newest[1]["created_at"], 7, 1, 1.0, MODEL_A),
        (ids[0], newest[2]["created_at"], 3, 3, 0.25, None),
    ]
    assert all(before <= row["created_at"] <= datetime.now(UTC) for row in newest)
    assert db.recent_predictions(limit=2) == newest[:2]
    assert db.count_predictions() == 3
    logged = [r.getMessage() for r in caplog.records if r.name == "db"]
    assert all(
        re.fullmatch(rf"inserted prediction id={n} in \d+\.\d ms", m)
        for n, m in zip(ids, logged, strict=True)
    )


@pytest.mark.parametrize("confidence", [1e-45, 1e-46, 5e-324])
def test_a_confidence_below_the_columns_range_is_stored_rounded(clean_db, confidence):
    db.log_prediction(1, 1, confidence)
    assert db.recent_predictions()[0]["confidence"] == pytest.approx(confidence, abs=1e-45)


@pytest.mark.parametrize(
    "call",
    [
        *(partial(db.log_prediction, p, 1, 0.5) for p in (10, -1, True, 1.0, "1")),
        *(partial(db.log_prediction, 1, t, 0.5) for t in (10, -1, "7", "\u0667", 7.0, False, None)),
        *(partial(db.log_prediction, 1, 1, c) for c in (1.5, -0.1, math.nan, math.inf, "0.5")),
        *(partial(db.log_prediction, 1, 1, c) for c in (True, None, INJECTION)),
        partial(db.log_prediction, 1, 1, 0.5, submission_id=str(uuid.uuid4())),
        *(partial(db.log_prediction, 1, 1, 0.5, model=m) for m in ("", "x" * 101, 7)),
        *(
            partial(db.log_prediction, 1, 1, 0.5, **dict(zip(SHADOW.split(", "), s, strict=True)))
            for s in [
                *((m, 1, 0.5) for m in ("", "x" * 101, 7)),
                *((MODEL_B, d, 0.5) for d in (10, -1, True, "1")),
                *((MODEL_B, 1, c) for c in (1.5, math.nan, "0.5")),
                (MODEL_B, 1, None),
                (None, 1, 0.5),
                (MODEL_B, None, None),
            ]
        ),
        *(partial(db.recent_predictions, limit) for limit in (0, True, INJECTION)),
    ],
    ids=lambda call: ascii((call.func.__name__, call.args, call.keywords))[:60],
)
def test_invalid_values_are_refused_before_reaching_the_database(call):
    db.configure(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")  # nobody listens
    with pytest.raises(ValueError):  # not DatabaseUnavailable: the server was never asked
        call()


def test_text_is_only_ever_a_value_never_sql(clean_db):
    db.log_prediction(1, 1, 0.5, model=INJECTION)
    assert [row["model"] for row in db.recent_predictions(model=INJECTION)] == [INJECTION]
    assert [entry["model"] for entry in db.models_answering()] == [INJECTION]
    assert INJECTION in db.export_csv(INJECTION).decode()
    assert rows(clean_db, "model") == [(INJECTION,)]


def test_8_threads_at_once_store_every_row_and_one_retried_submission_once(clean_db):
    sid = uuid.uuid4()

    def save(n: int) -> tuple[int, list[int]]:
        retried = db.log_prediction(2, 3, 0.5, submission_id=sid)  # all 8 at once
        return retried, [db.log_prediction((n + i) % 10, i % 10, i / 19) for i in range(20)]

    results = [result for _, result in run_at_once(8, save)]
    assert [result for result in results if isinstance(result, Exception)] == []
    assert len({retried for retried, _ in results}) == 1
    assert len({row_id for _, own in results for row_id in own}) == 160
    assert len(rows(clean_db)) == db.count_predictions() == 161


# --- drawings ------------------------------------------------------------------------------------


def a_drawing(strokes=None, image: bytes = bytes(range(256)) * 3 + bytes(16)) -> db.Drawing:
    """A drawing as the app stores it: a 7 in two strokes, on the 280 px canvas, brush 18."""
    if strokes is None:
        strokes = [[[70.5, 50.0], [210.0, 50.25]], [[207.0, 54.0], [120.0, 240.0]]]
    return db.Drawing(strokes, 280, 18.0, image)


def drawing_rows(server: PostgresProcess, dbname: str = "postgres") -> list[tuple]:
    with server.connect(dbname=dbname) as conn:
        return conn.execute(
            "SELECT p.submission_id, d.strokes, d.canvas_size, d.brush_width, d.image"
            " FROM drawings d JOIN predictions p ON p.id = d.prediction_id ORDER BY p.id"
        ).fetchall()


def test_an_answer_and_its_drawing_are_stored_together_once(clean_db):
    drawing, sid = a_drawing(), uuid.uuid4()
    row_id = db.log_prediction(7, 7, 0.9, sid, MODEL_A, drawing=drawing)
    assert db.log_prediction(7, 7, 0.9, sid, MODEL_A, drawing=drawing) == row_id  # a retry
    db.log_prediction(1, 1, 0.8)  # without a drawing (STORE_DRAWINGS off): the answer alone
    assert drawing_rows(clean_db) == [(sid, drawing.strokes, 280, 18.0, drawing.image)]
    assert rows(clean_db) == [(7, 7), (1, 1)]
    assert db.count_predictions() == 2


def test_an_answer_whose_drawing_cannot_be_stored_is_not_stored_either(clean_db):
    drawing = a_drawing()
    object.__setattr__(drawing, "image", b"\x00" * 783)  # past the Python checks: the CHECK
    with pytest.raises(errors.CheckViolation):
        db.log_prediction(7, 7, 0.9, uuid.uuid4(), drawing=drawing)
    assert rows(clean_db) == [] and drawing_rows(clean_db) == []


def test_without_the_drawings_table_an_answer_with_a_drawing_says_to_migrate(clean_db):
    """E.g. an upgraded app whose database was not migrated: nothing half-stored."""
    with clean_db.connect() as conn:
        conn.execute("DROP TABLE drawings")
    with pytest.raises(RuntimeError, match="python db.py migrate"):
        db.log_prediction(7, 7, 0.9, uuid.uuid4(), drawing=a_drawing())
    assert rows(clean_db) == []
    db.log_prediction(7, 7, 0.9)  # answers alone (STORE_DRAWINGS=false) still work
    assert rows(clean_db) == [(7, 7)]


def stroke(points: int, x: float = 100.0) -> list[list[float]]:
    return [[x, 10.0 + n % 200] for n in range(points)]


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: a_drawing([stroke(1)] * (db.MAX_STROKES + 1)), db.DrawingTooLarge),
        (lambda: a_drawing([stroke(db.MAX_STROKE_POINTS + 1)]), db.DrawingTooLarge),
        (lambda: a_drawing([stroke(db.MAX_STROKE_POINTS)] * 6), db.DrawingTooLarge),
        (lambda: a_drawing([]), ValueError),
        (lambda: a_drawing([[]]), ValueError),
        (lambda: a_drawing([[[1.0, 2.0, 3.0]]]), ValueError),
        (lambda: a_drawing([[["1", 2.0]]]), ValueError),
        (lambda: a_drawing([[[math.nan, 2.0]]]), ValueError),
        (lambda: a_drawing([[[1.0, 561.0]]]), ValueError),  # beyond twice the canvas
        (lambda: a_drawing(image=bytes(783)), ValueError),
        (lambda: db.Drawing([stroke(2)], 0, 18.0, bytes(784)), ValueError),
        (lambda: db.Drawing([stroke(2)], 280, 0.0, bytes(784)), ValueError),
        (lambda: db.Drawing([stroke(2)], 280, 141.0, bytes(784)), ValueError),
    ],
    ids=lambda v: "" if callable(v) else v.__name__,
)
def test_a_drawing_over_the_limits_or_malformed_is_refused_in_python(make, error):
    with pytest.raises(error):
        make()


def test_the_limits_fit_a_real_drawing_at_their_edge():
    """Exactly at every limit: accepted."""
    per_stroke = db.MAX_POINTS // db.MAX_STROKES
    assert a_drawing([stroke(per_stroke)] * db.MAX_STROKES)
    assert a_drawing([stroke(db.MAX_STROKE_POINTS)] * (db.MAX_POINTS // db.MAX_STROKE_POINTS))


GOOD_STROKES = "[[[70.5, 50], [210, 50.25]]]"


@pytest.mark.parametrize(
    ("strokes", "size", "brush", "image_bytes"),
    [
        ("[]", 280, 18, 784),
        ("{}", 280, 18, 784),
        ("[[]]", 280, 18, 784),
        ("[[[1, 2, 3]]]", 280, 18, 784),
        ('[[["1", 2]]]', 280, 18, 784),
        ("[[[1, 561]]]", 280, 18, 784),
        ("[[[-281, 1]]]", 280, 18, 784),
        ("[[[1, 2]], 5]", 280, 18, 784),
        ("[[[1, 2]], [5]]", 280, 18, 784),
        ("[[[1, 2]], [[null, 2]]]", 280, 18, 784),
        (Jsonb([[[1, 2]]] * (db.MAX_STROKES + 1)), 280, 18, 784),
        (Jsonb([[[1, 2]] * (db.MAX_STROKE_POINTS + 1)]), 280, 18, 784),
        (Jsonb([[[1, 2]] * db.MAX_STROKE_POINTS] * 6), 280, 18, 784),
        (GOOD_STROKES, 27, 1, 784),
        (GOOD_STROKES, 280, 0, 784),
        (GOOD_STROKES, 280, 141, 784),
        (GOOD_STROKES, 280, 18, 783),
    ],
    ids=lambda value: ascii(value)[:24],
)
def test_the_drawings_table_refuses_what_python_refuses(
    clean_db, strokes, size, brush, image_bytes
):
    """The last line of defence, for writers other than db.log_prediction."""
    with clean_db.connect() as conn:
        conn.execute(
            "INSERT INTO drawings (prediction_id, strokes, canvas_size, brush_width, image)"
            " VALUES (%s, %s, 280, 18, %s)",
            (db.log_prediction(1, 1, 0.5), GOOD_STROKES, bytes(784)),
        )  # the control: a good row goes in
        with pytest.raises(errors.CheckViolation), conn.transaction():
            conn.execute(
                "INSERT INTO drawings (prediction_id, strokes, canvas_size, brush_width, image)"
                " VALUES (%s, %s, %s, %s, %s)",
                (db.log_prediction(2, 2, 0.5), strokes, size, brush, bytes(image_bytes)),
            )
    assert len(drawing_rows(clean_db)) == 1


def test_export_drawings_writes_every_answer_with_its_drawing_as_json_lines(
    clean_db, monkeypatch, tmp_path
):
    import json

    db.log_prediction(1, 1, 0.5)  # an answer from before drawings were kept: not exported
    sid, drawing = uuid.uuid4(), a_drawing()
    row_id = db.log_prediction(7, 1, 0.75, sid, MODEL_A, drawing=drawing)
    monkeypatch.setenv("DATABASE_URL", clean_db.url)  # the owner
    out = tmp_path / "drawings.jsonl"
    assert db.main(["db.py", "export-drawings", str(out)]) == 0
    (line,) = [json.loads(text) for text in out.read_text().splitlines()]
    assert datetime.fromisoformat(line.pop("created_at")) <= datetime.now(UTC)
    assert base64.b64decode(line.pop("image")) == drawing.image
    assert line == {
        "prediction_id": row_id,
        "submission_id": str(sid),
        "predicted_digit": 7,
        "true_label": 1,
        "confidence": 0.75,
        "model": MODEL_A,
        "strokes": drawing.strokes,
        "canvas_size": 280,
        "brush_width": 18.0,
    }
    assert not list(tmp_path.glob("*.partial"))


# --- unavailable, hung and busy database --------------------------------------------------------


def assert_unavailable(call, *args, within: float = 5):
    start = time.monotonic()
    with pytest.raises(db.DatabaseUnavailable, match="^database unreachable: ") as info:
        call(*args)
    elapsed = time.monotonic() - start
    assert elapsed < within, f"{call.__name__} took {elapsed:.1f} s to fail"
    assert not isinstance(info.value, db.DatabaseBusy)


def test_a_stopped_server_fails_fast_and_the_first_save_after_it_is_stored_once(fresh_pg_server):
    db.configure(fresh_pg_server.url)
    db.init_db()
    ids = [db.log_prediction(1, 2, 0.5)]
    # A crash and restart while the pool is idle goes unnoticed: its dead connection is replaced.
    fresh_pg_server.stop(mode="immediate")
    fresh_pg_server.start()
    ids.append(db.log_prediction(2, 2, 0.5))

    fresh_pg_server.stop()  # the pool still holds a connection to it
    sid = uuid.uuid4()
    assert_unavailable(db.log_prediction, 3, 4, 0.5, sid)
    # Known down: every call answers within a second.
    for call, args in [(db.log_prediction, (3, 4, 0.5, sid)), (db.recent_predictions, ())]:
        assert_unavailable(call, *args, within=1)
    assert_unavailable(db.init_db, within=1)

    fresh_pg_server.start()
    ids.append(db.log_prediction(3, 4, 0.5, submission_id=sid))
    assert db.log_prediction(3, 4, 0.5, submission_id=sid) == ids[-1]
    assert [row["id"] for row in db.recent_predictions()] == ids[::-1]


def test_a_hung_server_answers_every_waiting_call_together(monkeypatch):
    monkeypatch.setattr(db, "CONNECT_TIMEOUT_S", 2)  # psycopg's minimum
    proxy = TcpProxy()  # accepts connections and never says a word
    db.configure(proxy.url)
    try:
        outcomes = run_at_once(6, lambda n: db.log_prediction(n, n, 0.5))
        times = sorted(elapsed for elapsed, _ in outcomes)
        for _, error in outcomes:
            assert isinstance(error, db.DatabaseUnavailable), error
            assert not isinstance(error, db.DatabaseBusy)
            assert "timeout" in str(error), error
        # Not one behind the other (2, 4, 6... s): all within the connect timeout, together.
        assert times[-1] < 2 + 1.5, times
        assert times[-1] - times[0] < 1, times
        assert_unavailable(db.log_prediction, 1, 1, 0.5, within=1)  # known down: fail fast
    finally:
        proxy.close()


def test_a_busy_server_is_waited_for_then_said_busy_not_down(clean_db, monkeypatch):
    """A restore-like lock holds the table: 40 saves at once (10 per pooled connection) wait
    their turn and are stored; held past the statement timeout, a save fails as busy, and the
    next one is not refused as if the server were down."""
    sids = [uuid.uuid4() for _ in range(40)]
    with clean_db.connect() as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        timer = threading.Timer(1, locker.execute, args=("COMMIT",))
        timer.start()
        outcomes = run_at_once(40, lambda n: db.log_prediction(n % 10, n % 10, 0.5, sids[n]))
        timer.join()
        assert [result for _, result in outcomes if not isinstance(result, int)] == []
        assert min(elapsed for elapsed, _ in outcomes) >= 0.8

        monkeypatch.setattr(db, "STATEMENT_TIMEOUT_S", 1)
        db.configure(clean_db.url)  # new connections, with the shorter timeout
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(db.DatabaseBusy, match="^database busy: .*longer than 1 s"):
            db.log_prediction(1, 1, 0.5)
        locker.execute("ROLLBACK")
    start = time.monotonic()
    db.log_prediction(2, 2, 0.5)
    assert time.monotonic() - start < 1
    stored = rows(clean_db, "submission_id")
    assert len(stored) == 41 and {sid for (sid,) in stored} == {*sids, None}


# --- where the database is, and the app's role --------------------------------------------------


URL_ENV = {"DATABASE_URL": "postgresql://u@h/d", "POSTGRES_HOST": "db"}
HOST_ENV = {"POSTGRES_HOST": "db", "POSTGRES_PORT": "1", "POSTGRES_DB": "d"}
HOST_ENV |= {"POSTGRES_USER": "o", "POSTGRES_PASSWORD": "s", "APP_DB_USER": "a"}


@pytest.mark.parametrize(
    ("env", "owner", "expected"),
    [
        (URL_ENV, True, "host=h user=u dbname=d"),
        (URL_ENV, False, "host=h user=u dbname=d"),
        (HOST_ENV, True, "host=db port=1 user=o password=s dbname=d"),
        ({**HOST_ENV, "APP_DB_PASSWORD": "p"}, False, "host=db port=1 user=a password=p dbname=d"),
        ({"DATABASE_URL": " ", "POSTGRES_HOST": "db", "POSTGRES_PORT": ""}, False,
         f"host=db port=5432 user={db.APP_ROLE} dbname=postgres"),
        ({"POSTGRES_HOST": "db"}, True, "host=db port=5432 user=postgres dbname=postgres"),
    ],
)  # fmt: skip
def test_resolve_conninfo_reads_the_environment(env, owner, expected):
    assert conninfo_to_dict(db.resolve_conninfo(env, owner=owner)) == conninfo_to_dict(expected)


def test_the_replicas_pools_must_fit_in_the_servers_connections(clean_db, monkeypatch, capsys):
    with clean_db.connect() as conn:
        settings = dict(conn.execute("SELECT name, setting FROM pg_settings").fetchall())
    allowed = int(settings["max_connections"]) - int(settings["superuser_reserved_connections"])
    allowed -= int(settings.get("reserved_connections", 0))
    fits = allowed // db.POOL_MAX_SIZE - 1  # replicas, and one more during a rolling update
    monkeypatch.setenv("APP_REPLICAS", str(fits))
    assert db.check_connection_budget() == allowed
    monkeypatch.setenv("APP_REPLICAS", str(fits + 1))
    needed = (fits + 2) * db.POOL_MAX_SIZE
    message = f"need {needed} connections, but PostgreSQL allows only {allowed}"
    with pytest.raises(RuntimeError, match=message):
        db.check_connection_budget()
    # The deploy's migration refuses before it changes anything.
    with clean_db.connect() as conn:
        conn.execute("DROP TABLE drawings, predictions")
    for name, value in {"DATABASE_URL": clean_db.url, "POSTGRES_HOST": ""}.items():
        monkeypatch.setenv(name, value)
    assert db.main(["db.py", "migrate"]) == 1
    assert message in capsys.readouterr().err
    with clean_db.connect() as conn:
        assert conn.execute("SELECT to_regclass('predictions')").fetchone() == (None,)


def test_the_app_role_reads_and_inserts_and_nothing_else(pg_server, monkeypatch):
    password = "p@ss w'o:r/d?#%\\"  # would break a hand-formatted URL
    with pg_server.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS feedback")
        conn.execute("CREATE DATABASE feedback")
    env = {
        "DATABASE_URL": "",
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(pg_server.port),
        "POSTGRES_USER": "postgres",  # the owner (trust authentication in these tests)
        "APP_DB_PASSWORD": password,
        "POSTGRES_DB": "feedback",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert db.main(["db.py", "migrate"]) == 0
    assert db.main(["db.py", "migrate"]) == 0  # idempotent

    db.configure()  # from the environment: the app role
    db.init_db()  # as the app role: checks, changes nothing
    sid = uuid.uuid4()
    assert db.log_prediction(4, 4, 0.5, sid) == db.log_prediction(4, 4, 0.5, sid)
    db.log_prediction(7, 7, 0.5, uuid.uuid4(), drawing=a_drawing())  # may insert a drawing
    assert len(db.recent_predictions()) == 2
    with psycopg.connect(db.resolve_conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (db.APP_ROLE,)
        for statement in [
            "DROP TABLE predictions",
            "CREATE TABLE t (x int)",
            "SELECT rolpassword FROM pg_authid",
            "DELETE FROM predictions",
            "UPDATE predictions SET true_label = 0",
            "ALTER TABLE predictions ADD COLUMN x int",
            "SELECT image FROM drawings",  # the app never reads drawings back
            "DELETE FROM drawings",
            "UPDATE drawings SET canvas_size = 28",
            "TRUNCATE drawings",
            "DROP TABLE drawings",
        ]:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)
    with pg_server.connect(dbname="feedback") as conn:
        assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM drawings").fetchone() == (1,)
        granted = conn.execute(
            "SELECT table_name, string_agg(privilege_type, ', ' ORDER BY privilege_type)"
            " FROM information_schema.role_table_grants WHERE grantee = %s"
            " GROUP BY 1 ORDER BY 1",
            (db.APP_ROLE,),
        ).fetchall()
        assert granted == [
            ("drawings", "INSERT"),
            ("learning_attempts", "SELECT"),
            ("model_promotions", "SELECT"),
            ("model_shadow", "SELECT"),
            ("model_versions", "SELECT"),
            ("predictions", "INSERT, SELECT"),
        ]

    # The password really is checked: a wrong one is refused.
    db.configure(db.resolve_conninfo({**env, "APP_DB_PASSWORD": "wrong"}))
    with pytest.raises(db.DatabaseUnavailable, match="password authentication failed"):
        db.count_predictions()


# --- History: counts from the database ----------------------------------------------------------


@pytest.fixture(scope="module")
def history_db(pg_server) -> tuple[str, list[tuple]]:
    """A database of its own holding 1,200 answers stored a minute apart, as (created_at,
    predicted_digit, true_label, confidence, model): 200 from before models were recorded,
    600 of model A, then 400 of model B, right nine times in ten."""
    rng = random.Random(16)
    history = []
    for n in range(1200):
        model = None if n < 200 else MODEL_A if n < 800 else MODEL_B
        true_label = rng.randrange(10)
        predicted = true_label if rng.random() < 0.9 else rng.randrange(10)
        start = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)
        history.append((start + timedelta(minutes=n), predicted, true_label, 0.5, model))
    with pg_server.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS history")
        conn.execute("CREATE DATABASE history")
    url = make_conninfo(pg_server.url, dbname="history")
    db.configure(url)
    db.init_db()
    db.configure(None)
    columns = "created_at, predicted_digit, true_label, confidence, model"
    with (
        psycopg.connect(url) as conn,
        conn.cursor().copy(f"COPY predictions ({columns}) FROM STDIN") as copy,
    ):
        for row in history:
            copy.write_row(row)
    return url, history


@pytest.fixture
def history(history_db) -> list[tuple]:
    db.configure(history_db[0])
    return history_db[1]


def of_model(rows: list[tuple], model: str | None) -> list[tuple]:
    """What the History filter *model* should select: None all, "" the unrecorded ones."""
    return [row for row in rows if model is None or (row[4] or "") == model]


def test_models_answering_counts_each_model_latest_first(history):
    def expected(model):
        rows = of_model(history, model)
        right = sum(row[1] == row[2] for row in rows)
        return (model, len(rows), right, rows[0][0], rows[-1][0])

    listed = [tuple(entry.values()) for entry in db.models_answering()]
    assert listed == [expected(MODEL_B), expected(MODEL_A), expected("")]


@pytest.mark.parametrize("model", [None, MODEL_A, MODEL_B, ""], ids=["all", "A", "B", "unrecorded"])
def test_history_counts_are_exactly_those_of_the_rows(history, model):
    rows = of_model(history, model)
    cells = Counter((true_label, predicted) for _, predicted, true_label, _, _ in rows)

    counted = {
        (c["true_label"], c["predicted_digit"]): c["answers"] for c in db.confusion_counts(model)
    }
    assert counted == cells
    assert [tuple(d.values()) for d in db.digit_accuracy(model)] == [
        (digit, sum(n for (t, _), n in cells.items() if t == digit), cells[digit, digit])
        for digit in range(10)
    ]
    mistakes = sorted(
        ((t, p, n) for (t, p), n in cells.items() if t != p), key=lambda c: (-c[2], c[0], c[1])
    )
    assert [tuple(c.values()) for c in db.most_confused(model, limit=5)] == mistakes[:5]
    newest = db.recent_predictions(limit=3, model=model)
    assert [(r["created_at"], r["model"]) for r in newest] == [(r[0], r[4]) for r in rows[:-4:-1]]
    exported = list(csv.DictReader(io.StringIO(db.export_csv(model).decode())))
    assert [
        (int(e["predicted_digit"]), int(e["true_label"]), float(e["confidence"]), e["model"])
        for e in exported
    ] == [(predicted, label, conf, m or "") for _, predicted, label, conf, m in rows]
    assert list(exported[0]) == [
        "id", "created_at", "predicted_digit", "true_label", "confidence", "model"
    ]  # fmt: skip


def test_accuracy_over_time_per_day_and_per_answers(history):
    def counted(key) -> list[tuple]:
        """(key..., answers, right) for the rows grouped by key(number, row), in time order."""
        answers, right = Counter(), Counter()
        for number, row in enumerate(history, start=1):
            answers[key(number, row)] += 1
            right[key(number, row)] += row[1] == row[2]
        return [(*group, answers[group], right[group]) for group in answers]

    per_day = [tuple(d.values()) for d in db.accuracy_per_day()]
    assert per_day == counted(lambda _, row: (row[0].date(), row[4] or ""))
    # Groups of 70: the 3rd (answers 141-210) is split where model A takes over.
    per_70 = db.accuracy_per_answers(size=70)
    assert [(g["model"], g["answers"], g["correct"]) for g in per_70] == [
        group[1:] for group in counted(lambda number, row: ((number - 1) // 70, row[4] or ""))
    ]
    assert [g["last_answer"] for g in per_70[1:4]] == [140, 200, 210]
    assert [g["answers"] for g in db.accuracy_per_answers(MODEL_B, size=100)] == [100] * 4


def test_shadow_pairs_count_the_live_model_against_the_shadow_on_the_same_drawings(clean_db):
    # (live digit, shadow digit, true label, live model, shadow model): without a shadow, not
    # counted.
    answers = [
        (7, 7, 7, MODEL_A, "s@1"),  # both right
        (7, 1, 7, MODEL_A, "s@1"),  # only the live model
        (1, 7, 7, MODEL_A, "s@1"),  # only the shadow
        (2, 3, 4, MODEL_A, "s@1"),  # neither
        (4, 4, 4, MODEL_A, "s@2"),
        (5, 6, 6, None, "s@2"),
        (9, None, 9, MODEL_A, None),
    ]
    for live, shadow, label, model, shadow_model in answers:
        db.log_prediction(
            live,
            label,
            0.5,
            model=model,
            shadow_model=shadow_model,
            shadow_digit=shadow,
            shadow_confidence=None if shadow is None else 0.5,
        )
    pairs = [{k: v for k, v in p.items() if not k.endswith("_at")} for p in db.shadow_pairs()]
    keys = ["answers", "live_right", "shadow_right", "only_live", "only_shadow"]
    assert pairs == [
        {"model": "", "shadow_model": "s@2", **dict(zip(keys, (1, 0, 1, 0, 1), strict=True))},
        {"model": MODEL_A, "shadow_model": "s@2", **dict(zip(keys, (1, 1, 1, 0, 0), strict=True))},
        {"model": MODEL_A, "shadow_model": "s@1", **dict(zip(keys, (4, 2, 2, 1, 1), strict=True))},
    ]
