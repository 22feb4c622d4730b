"""Every setting the product reads from its environment, each with its default, in one place.

Each function reads its variable when called (a change takes effect at the next call) from
*environ*, by default ``os.environ`` after loading the project's ``.env`` into it once
(``environment()``: a variable already set wins over its line in the file). Empty values count
as unset. A value that cannot be used raises ``SettingError``, naming the variable and what it
expects; the app's two switches, ``APP_THREADS`` and ``STORE_DRAWINGS``, log a warning and keep
their default instead.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
from collections.abc import Mapping
from pathlib import Path

from dotenv import load_dotenv

logger = logging.getLogger("settings")

PROJECT_ROOT = Path(__file__).resolve().parent
ENV_FILE = PROJECT_ROOT / ".env"  # read by environment(); docker compose reads it too

APP_ROLE = "mnist_app"  # the app's database login, unless APP_DB_USER says otherwise
DEFAULT_MODEL_PATH = PROJECT_ROOT / "models" / "model.pth"
DEFAULT_MNIST_DIR = Path("data/mnist")
DEFAULT_PENDIGITS_DIR = Path("data/pendigits")


class SettingError(RuntimeError):
    """An environment variable holds a value that cannot be used."""


def environment() -> Mapping[str, str]:
    """``os.environ``, after loading ``ENV_FILE`` into it (if there is one), once per process: a
    variable already set wins over its line in the file."""
    _load_env_file(ENV_FILE)
    return os.environ


@functools.cache  # parsing a .env takes ~10 ms, and the app reads settings on every run
def _load_env_file(path: Path) -> None:
    load_dotenv(path)


def _environ(given: Mapping[str, str] | None) -> Mapping[str, str]:
    return environment() if given is None else given


# --- the database (see db.resolve_conninfo) -------------------------------------------------


def database_url(environ: Mapping[str, str] | None = None) -> str | None:
    """``DATABASE_URL``: the database's connection string, for the app and the owner alike;
    None if unset."""
    return _environ(environ).get("DATABASE_URL", "").strip() or None


def postgres_host(environ: Mapping[str, str] | None = None) -> str | None:
    """``POSTGRES_HOST``: the server, when DATABASE_URL is unset; None if unset too (then the
    embedded PostgreSQL)."""
    return _environ(environ).get("POSTGRES_HOST", "").strip() or None


def postgres_port(environ: Mapping[str, str] | None = None) -> str:
    """``POSTGRES_PORT``: the server's port (default 5432)."""
    return _environ(environ).get("POSTGRES_PORT") or "5432"


def postgres_db(environ: Mapping[str, str] | None = None) -> str:
    """``POSTGRES_DB``: the database's name (default postgres)."""
    return _environ(environ).get("POSTGRES_DB") or "postgres"


def postgres_user(environ: Mapping[str, str] | None = None) -> str:
    """``POSTGRES_USER``: the schema's owner (default postgres)."""
    return _environ(environ).get("POSTGRES_USER") or "postgres"


def postgres_password(environ: Mapping[str, str] | None = None) -> str | None:
    """``POSTGRES_PASSWORD``, else the file ``POSTGRES_PASSWORD_FILE`` names: the owner's
    password; None if neither is set."""
    return _secret("POSTGRES_PASSWORD", _environ(environ))


def app_db_user(environ: Mapping[str, str] | None = None) -> str:
    """``APP_DB_USER``: the app's login (default ``APP_ROLE``)."""
    return _environ(environ).get("APP_DB_USER") or APP_ROLE


def app_db_password(environ: Mapping[str, str] | None = None) -> str | None:
    """``APP_DB_PASSWORD``, else the file ``APP_DB_PASSWORD_FILE`` names: the app's password;
    None if neither is set."""
    return _secret("APP_DB_PASSWORD", _environ(environ))


def _secret(name: str, environ: Mapping[str, str]) -> str | None:
    """The value of variable *name*, else the content of the file ``<name>_FILE`` names (Docker
    secrets: ``APP_DB_PASSWORD_FILE=/run/secrets/...``, one trailing newline dropped), else None."""
    if value := environ.get(name):
        return value
    if path := environ.get(f"{name}_FILE", "").strip():
        try:
            return Path(path).read_text().removesuffix("\n") or None
        except OSError as exc:
            raise SettingError(
                f"{name}_FILE={path!r} is not a readable file ({exc.strerror})"
            ) from exc
    return None


def app_replicas(environ: Mapping[str, str] | None = None) -> int | None:
    """``APP_REPLICAS``: how many app replicas share the database (deploy/stack-deploy.sh passes
    the count it runs); None if unset: one app (``db.check_connection_budget`` counts 1, and
    ``python db.py migrate`` skips that check)."""
    value = _environ(environ).get("APP_REPLICAS")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SettingError(f"APP_REPLICAS={value!r} is not a number") from None


# --- the model and the data -----------------------------------------------------------------


def model_path(environ: Mapping[str, str] | None = None) -> Path:
    """``MODEL_PATH``: where the app finds its weights (default ``DEFAULT_MODEL_PATH``,
    models/model.pth in the project)."""
    return Path(_environ(environ).get("MODEL_PATH") or DEFAULT_MODEL_PATH)


def mnist_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``MNIST_DIR``: the folder of the MNIST files (default data/mnist)."""
    return Path(_environ(environ).get("MNIST_DIR") or DEFAULT_MNIST_DIR)


def pendigits_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``PENDIGITS_DIR``: the folder of the pen digits file (default data/pendigits)."""
    return Path(_environ(environ).get("PENDIGITS_DIR") or DEFAULT_PENDIGITS_DIR)


# --- the app --------------------------------------------------------------------------------


def app_threads(environ: Mapping[str, str] | None = None) -> int:
    """``APP_THREADS``: torch threads for predictions (default 1); anything but a positive whole
    number logs a warning and counts as 1."""
    value = _environ(environ).get("APP_THREADS", "").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        logger.warning("APP_THREADS=%r is not a positive integer: using 1 thread", value)
        return 1
    return int(value)


def store_drawings(environ: Mapping[str, str] | None = None) -> bool:
    """``STORE_DRAWINGS``: whether each answer's drawing is kept (default on; false, 0, no or
    off turn it off); anything else logs a warning, once, and keeps them."""
    return _store_drawings(_environ(environ).get("STORE_DRAWINGS", ""))


@functools.cache  # read on every run: an unknown value is logged once
def _store_drawings(value: str) -> bool:
    value = value.strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    logger.warning("STORE_DRAWINGS=%r is not true or false: drawings are kept", value)
    return True


# --- the learner (learner.py) ---------------------------------------------------------------

DEFAULT_LEARN_MIN_ANSWERS = 200
DEFAULT_LEARN_EVERY = "24h"
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def learn_min_answers(environ: Mapping[str, str] | None = None) -> int:
    """``LEARN_MIN_ANSWERS``: the answered drawings that must have arrived since the learner's
    last attempt before it tries again (default 200)."""
    value = _environ(environ).get("LEARN_MIN_ANSWERS", "").strip()
    if not value:
        return DEFAULT_LEARN_MIN_ANSWERS
    if not value.isdigit() or int(value) < 1:
        raise SettingError(f"LEARN_MIN_ANSWERS={value!r} is not a positive whole number")
    return int(value)


def learn_every(environ: Mapping[str, str] | None = None) -> float:
    """``LEARN_EVERY``: the least time between two of the learner's attempts, in seconds: a
    number with s, m, h or d (default 24h; a bare number is seconds)."""
    value = _environ(environ).get("LEARN_EVERY", "").strip().lower() or DEFAULT_LEARN_EVERY
    number, unit = (value[:-1], value[-1]) if value[-1] in _DURATION_UNITS else (value, "s")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise SettingError(
            f"LEARN_EVERY={value!r} is not a duration: a number with s, m, h or d, e.g. 24h"
        )
    return seconds


def learn_train_args(environ: Mapping[str, str] | None = None) -> list[str]:
    """``LEARN_TRAIN_ARGS``: more train.py flags for the learner's runs, after its own recipe
    (learner.RECIPE), in shell syntax (default none)."""
    value = _environ(environ).get("LEARN_TRAIN_ARGS", "")
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise SettingError(
            f"LEARN_TRAIN_ARGS={value!r} cannot be split into flags: {exc}"
        ) from None
