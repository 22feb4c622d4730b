"""settings.py: every environment variable the product reads, its default, and its errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import settings

NAMES = [
    "DATABASE_URL", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_USER",
    "POSTGRES_PASSWORD", "POSTGRES_PASSWORD_FILE", "APP_DB_USER", "APP_DB_PASSWORD",
    "APP_DB_PASSWORD_FILE", "APP_REPLICAS", "MODEL_PATH", "MNIST_DIR", "PENDIGITS_DIR",
    "APP_THREADS", "STORE_DRAWINGS", "LEARN_MIN_ANSWERS", "LEARN_EVERY", "LEARN_TRAIN_ARGS",
]  # fmt: skip


def read_all(environ: dict[str, str]) -> dict[str, object]:
    return {
        "database_url": settings.database_url(environ),
        "postgres_host": settings.postgres_host(environ),
        "postgres_port": settings.postgres_port(environ),
        "postgres_db": settings.postgres_db(environ),
        "postgres_user": settings.postgres_user(environ),
        "postgres_password": settings.postgres_password(environ),
        "app_db_user": settings.app_db_user(environ),
        "app_db_password": settings.app_db_password(environ),
        "app_replicas": settings.app_replicas(environ),
        "model_path": settings.model_path(environ),
        "mnist_dir": settings.mnist_dir(environ),
        "pendigits_dir": settings.pendigits_dir(environ),
        "app_threads": settings.app_threads(environ),
        "store_drawings": settings.store_drawings(environ),
        "learn_min_answers": settings.learn_min_answers(environ),
        "learn_every": settings.learn_every(environ),
        "learn_train_args": settings.learn_train_args(environ),
    }


@pytest.mark.parametrize("environ", [{}, dict.fromkeys(NAMES, "")], ids=["unset", "empty"])
def test_every_setting_has_its_default_and_an_empty_value_counts_as_unset(environ):
    assert read_all(environ) == {
        "database_url": None,  # then POSTGRES_HOST, else the embedded PostgreSQL
        "postgres_host": None,
        "postgres_port": "5432",
        "postgres_db": "postgres",
        "postgres_user": "postgres",
        "postgres_password": None,
        "app_db_user": "mnist_app",
        "app_db_password": None,
        "app_replicas": None,  # one app
        "model_path": Path(__file__).resolve().parent.parent / "models" / "model.pth",
        "mnist_dir": Path("data/mnist"),
        "pendigits_dir": Path("data/pendigits"),
        "app_threads": 1,
        "store_drawings": True,
        "learn_min_answers": 200,
        "learn_every": 24 * 3600.0,
        "learn_train_args": [],
    }


def test_each_setting_reads_its_variable():
    environ = {
        "DATABASE_URL": " postgresql://u@h/d ",
        "POSTGRES_HOST": " db ",
        "POSTGRES_PORT": "6543",
        "POSTGRES_DB": "feedback",
        "POSTGRES_USER": "owner",
        "POSTGRES_PASSWORD": "owner's",
        "APP_DB_USER": "app",
        "APP_DB_PASSWORD": "app's",
        "APP_REPLICAS": "3",
        "MODEL_PATH": "/models/other.pth",
        "MNIST_DIR": "/data/mnist",
        "PENDIGITS_DIR": "/data/pen",
        "APP_THREADS": " 4 ",
        "STORE_DRAWINGS": " Off ",
        "LEARN_MIN_ANSWERS": "50",
        "LEARN_EVERY": "90m",
        "LEARN_TRAIN_ARGS": "--epochs 3 --pen-file '/data/pen digits.tra'",
    }
    assert read_all(environ) == {
        "database_url": "postgresql://u@h/d",
        "postgres_host": "db",
        "postgres_port": "6543",
        "postgres_db": "feedback",
        "postgres_user": "owner",
        "postgres_password": "owner's",
        "app_db_user": "app",
        "app_db_password": "app's",
        "app_replicas": 3,
        "model_path": Path("/models/other.pth"),
        "mnist_dir": Path("/data/mnist"),
        "pendigits_dir": Path("/data/pen"),
        "app_threads": 4,
        "store_drawings": False,
        "learn_min_answers": 50,
        "learn_every": 5400.0,
        "learn_train_args": ["--epochs", "3", "--pen-file", "/data/pen digits.tra"],
    }


def test_a_setting_follows_the_environment_at_each_call(monkeypatch):
    monkeypatch.setenv("APP_REPLICAS", "2")
    assert settings.app_replicas() == 2
    monkeypatch.setenv("APP_REPLICAS", "5")
    assert settings.app_replicas() == 5


def test_the_env_file_is_read_and_a_variable_already_set_wins(monkeypatch, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("MODEL_PATH=/from/file.pth\nMNIST_DIR=/from/file\n")
    monkeypatch.setattr(settings, "ENV_FILE", env_file)
    monkeypatch.setenv("MODEL_PATH", "/from/environment.pth")
    monkeypatch.setenv("MNIST_DIR", "")  # so that monkeypatch removes it again afterwards...
    monkeypatch.delenv("MNIST_DIR")  # ...unset: the file's line applies
    # Given a mapping of its own (as tests do), a setting reads only that.
    assert settings.mnist_dir({}) == Path("data/mnist") and "MNIST_DIR" not in os.environ
    assert settings.model_path() == Path("/from/environment.pth")
    assert settings.mnist_dir() == Path("/from/file")


def test_a_password_comes_from_its_variable_else_from_the_file_its_FILE_variable_names(tmp_path):
    (tmp_path / "app").write_text("from file\n")  # as `echo ... | docker secret create`
    (tmp_path / "owner").write_text("owner's")
    env = {"POSTGRES_HOST": "db", "APP_DB_PASSWORD_FILE": str(tmp_path / "app")}
    env |= {"POSTGRES_PASSWORD_FILE": str(tmp_path / "owner")}
    assert settings.app_db_password(env) == "from file"
    assert settings.postgres_password(env) == "owner's"
    env["APP_DB_PASSWORD"] = "variable"
    assert settings.app_db_password(env) == "variable"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"APP_REPLICAS": "x"}, "APP_REPLICAS='x' is not a number"),
        ({"APP_REPLICAS": " "}, "APP_REPLICAS=' ' is not a number"),
        (
            {"APP_DB_PASSWORD_FILE": "/nonexistent/app_db_password"},
            "APP_DB_PASSWORD_FILE='/nonexistent/app_db_password' is not a readable file"
            " (No such file or directory)",
        ),
        ({"LEARN_MIN_ANSWERS": "0"}, "LEARN_MIN_ANSWERS='0' is not a positive whole number"),
        (
            {"LEARN_EVERY": "daily"},
            "LEARN_EVERY='daily' is not a duration: a number with s, m, h or d, e.g. 24h",
        ),
        (
            {"LEARN_TRAIN_ARGS": "--pen-file 'unclosed"},
            'LEARN_TRAIN_ARGS="--pen-file \'unclosed" cannot be split into flags:'
            " No closing quotation",
        ),
    ],
    ids=["replicas", "replicas-blank", "password-file", "learn-min", "learn-every", "learn-args"],
)
def test_a_bad_value_is_an_error_naming_the_variable_and_what_it_expects(environ, message):
    with pytest.raises(settings.SettingError) as error:
        read_all(environ)
    assert str(error.value) == message
    assert isinstance(error.value, RuntimeError)  # as `python db.py migrate` reports it


@pytest.mark.parametrize(
    ("read", "environ", "default", "warning"),
    [
        (settings.app_threads, {"APP_THREADS": "x"}, 1,
         "APP_THREADS='x' is not a positive integer: using 1 thread"),
        (settings.app_threads, {"APP_THREADS": "0"}, 1,
         "APP_THREADS='0' is not a positive integer: using 1 thread"),
        (settings.store_drawings, {"STORE_DRAWINGS": "maybe"}, True,
         "STORE_DRAWINGS='maybe' is not true or false: drawings are kept"),
    ],
)  # fmt: skip
def test_an_app_switch_with_a_bad_value_keeps_its_default_and_says_so(
    caplog, read, environ, default, warning
):
    caplog.set_level(logging.WARNING, logger="settings")
    assert read(environ) == default
    assert [record.getMessage() for record in caplog.records] == [warning]


def test_an_unknown_store_drawings_value_is_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="settings")
    for _ in range(3):  # read on every run of the app
        assert settings.store_drawings({"STORE_DRAWINGS": "perhaps"})
    assert len(caplog.records) == 1
