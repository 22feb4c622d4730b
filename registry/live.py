"""The live model in an app process: the registry's live version, followed as it changes.

A promotion (registry/promotion.py) or a rollback (registry/store.py) reaches every app process,
on any machine, within ~MODEL_CHECK_S seconds: each reads the live version from PostgreSQL with
the app's pool (the app's role may only read the registry's tables). No shared filesystem, no
restart.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable

import torch
from psycopg import errors

import db
import model as model_lib
from registry.store import load_weights, sha256_of, version_name

log = logging.getLogger("versions")  # the registry's logger (registry/store.py)

MODEL_CHECK_S = 10.0  # an app process asks for the live version's hash at most this often


class LiveModel:
    """The model an app process serves, with its name for ``predictions.model``.

    The first ``get()`` looks up the live version, then starts a thread that looks again every
    *check_s* seconds (a one-row query with the app's pool), whether or not anyone draws; a new
    hash's weights are read once, checked against their hash, loaded, passed to *prepare*
    (warm-up: what it returns, if anything, is served instead), and served from the next
    ``get()`` on. ``get()`` itself never touches the
    database. While the database is down or the new weights are unusable, the current model
    stays (logged); with an empty (or not yet migrated) registry, ``load_file()`` serves
    models/model.pth as before versions existed. The thread ends once the LiveModel is gone.
    """

    def __init__(
        self,
        load_file: Callable[[], tuple[torch.nn.Module, str]],
        prepare: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None,
        check_s: float | None = None,
    ) -> None:
        self.load_file = load_file
        self.prepare = prepare
        self.check_s = MODEL_CHECK_S if check_s is None else check_s
        self._lock = threading.Lock()
        self._started = False
        self.closed = False  # close(): the thread stops
        self._served: tuple[torch.nn.Module, str] | None = None  # from the registry
        self._sha: str | None = None
        self._unusable: set[str] = set()  # hashes whose weights failed: not read again
        self._problem: str | None = None  # the last failure logged, to log each one once

    @property
    def sha256(self) -> str | None:
        return self._sha

    def get(self) -> tuple[torch.nn.Module, str]:
        if not self._started:
            with self._lock:
                if not self._started:
                    self._check()
                    threading.Thread(
                        target=_follow_live,
                        args=(weakref.ref(self), self.check_s),
                        name="live-model",
                        daemon=True,
                    ).start()
                    self._started = True
        served = self._served
        return served if served is not None else self.load_file()

    def close(self) -> None:
        """Stop looking for new versions (the thread ends at its next wake-up)."""
        self.closed = True

    def _check(self) -> None:
        try:
            self._follow()
        except Exception as exc:
            self._report(f"kept the model {self._current_name()}: {exc}", exc)
        else:
            self._problem = None

    def _current_name(self) -> str:
        return self._served[1] if self._served else "file " + str(model_lib.model_path())

    def _report(self, message: str, exc: Exception) -> None:
        if message != self._problem:
            expected = isinstance(exc, (db.DatabaseUnavailable, model_lib.ModelLoadError))
            if expected:
                log.warning(message)
            else:
                log.exception(message)
        self._problem = message

    def _follow(self) -> None:
        try:
            with db.connection() as conn:
                row = conn.execute(
                    "SELECT sha256 FROM model_promotions ORDER BY id DESC LIMIT 1"
                ).fetchone()
                sha = row[0] if row else None
                if sha is None or sha == self._sha or sha in self._unusable:
                    weights = None
                else:
                    found = conn.execute(
                        "SELECT weights FROM model_versions WHERE sha256 = %s", (sha,)
                    ).fetchone()
                    weights = bytes(found[0])
        except errors.UndefinedTable:
            sha = weights = None  # not migrated yet: no versions
        if sha is None:
            if self._served is not None:
                log.warning("the registry has no live version: serving the model file")
            self._served, self._sha = None, None
            return
        if weights is None:
            return
        name = version_name(sha)
        try:
            if sha256_of(weights) != sha:
                raise model_lib.ModelLoadError(f"version {name}: weights do not match their hash")
            net = load_weights(weights, f"version {name}")
            if self.prepare is not None and (prepared := self.prepare(net)) is not None:
                net = prepared
        except model_lib.ModelLoadError:
            self._unusable.add(sha)
            raise
        previous = self._current_name()
        self._served, self._sha = (net, name), sha
        log.info("now serving version %s (was %s)", name, previous)


def _follow_live(ref: weakref.ref[LiveModel], interval: float) -> None:
    """A LiveModel's thread: a check every *interval* seconds while the LiveModel exists."""
    while True:
        time.sleep(interval)
        if (live := ref()) is None or live.closed:
            return
        live._check()
        del live
