"""The live model in an app process: the registry's live version, followed as it changes.

A promotion (registry/promotion.py) or a rollback (registry/store.py) reaches every app process,
on any machine, within ~MODEL_CHECK_S seconds: each reads the live version from PostgreSQL with
the app's pool (the app's role may only read the registry's tables). No shared filesystem, no
restart. So does the version set in shadow (``versions.py shadow``), which reads every drawing
beside the live model.
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
from registry.store import live_sha, load_weights, sha256_of, shadow_sha, version_name

log = logging.getLogger("versions")  # the registry's logger (registry/store.py)

MODEL_CHECK_S = 10.0  # an app process asks for the live version's hash at most this often

Found = tuple[str | None, bytes | None]  # a version's hash, and its weights if they are to load


class LiveModel:
    """The model an app process serves, with its name for ``predictions.model``, and the
    shadow model beside it, if one is set.

    The first ``get()`` looks up the live version, then starts a thread that looks again every
    *check_s* seconds (a one-row query with the app's pool), whether or not anyone draws; a new
    hash's weights are read once, checked against their hash, loaded, passed to *prepare*
    (warm-up: what it returns, if anything, is served instead), and served from the next
    ``get()`` on. ``get()`` itself never touches the
    database. While the database is down or the new weights are unusable, the current model
    stays (logged); with an empty (or not yet migrated) registry, ``load_file()`` serves
    models/model.pth as before versions existed. The thread ends once the LiveModel is gone.

    The version in shadow (``versions.py shadow``) is followed the same way, by the same checks,
    and ``shadow()`` hands it out without touching the database: kept while the database is
    down; none while none is set, while it is the live version itself, or when its weights are
    unusable (logged once, not read again).
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
        self._shadow: tuple[torch.nn.Module, str] | None = None
        self._shadow_sha: str | None = None  # the shadow set in the registry, as last followed
        self._unusable: set[str] = set()  # hashes whose weights failed: not read again
        self._problems: set[str] = set()  # the failures of the last check, each logged once

    @property
    def sha256(self) -> str | None:
        return self._sha

    def get(self) -> tuple[torch.nn.Module, str]:
        self._start()
        served = self._served
        return served if served is not None else self.load_file()

    def shadow(self) -> tuple[torch.nn.Module, str] | None:
        """The shadow model and its name for ``predictions.shadow_model``; None without one."""
        self._start()
        return self._shadow

    def close(self) -> None:
        """Stop looking for new versions (the thread ends at its next wake-up)."""
        self.closed = True

    def _start(self) -> None:
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

    def _check(self) -> None:
        problems: dict[str, Exception] = {}
        try:
            live, shadow = self._look_up()
        except Exception as exc:
            problems[f"kept the model {self._current_name()}: {exc}"] = exc
        else:
            try:
                self._follow(*live)
            except Exception as exc:
                problems[f"kept the model {self._current_name()}: {exc}"] = exc
            try:
                self._follow_shadow(*shadow)
            except Exception as exc:
                problems[f"no shadow model: {exc}"] = exc
        for message, exc in problems.items():
            if message not in self._problems:
                self._report(message, exc)
        self._problems = set(problems)

    def _current_name(self) -> str:
        return self._served[1] if self._served else "file " + str(model_lib.model_path())

    def _report(self, message: str, exc: Exception) -> None:
        if isinstance(exc, (db.DatabaseUnavailable, model_lib.ModelLoadError)):
            log.warning(message)
        else:
            log.exception(message)

    def _look_up(self) -> tuple[Found, Found]:
        """The live and shadow versions' hashes, each with its weights where they are to be
        loaded (a hash not followed yet and not found unusable), else None."""

        def weights(conn, sha: str | None, followed: str | None) -> bytes | None:
            if sha is None or sha == followed or sha in self._unusable:
                return None
            found = conn.execute(
                "SELECT weights FROM model_versions WHERE sha256 = %s", (sha,)
            ).fetchone()
            return bytes(found[0])

        try:
            with db.connection() as conn:
                sha = live_sha(conn)
                try:
                    with conn.transaction():  # a savepoint: the error below leaves the rest
                        shadow = shadow_sha(conn)
                except errors.UndefinedTable:
                    shadow = None  # migrated before shadows existed
                if shadow == sha:
                    shadow = None  # the live model itself: nothing to compare
                return (
                    (sha, weights(conn, sha, self._sha)),
                    (shadow, weights(conn, shadow, self._shadow_sha)),
                )
        except errors.UndefinedTable:
            return (None, None), (None, None)  # not migrated yet: no versions

    def _follow(self, sha: str | None, weights: bytes | None) -> None:
        if sha is None:
            if self._served is not None:
                log.warning("the registry has no live version: serving the model file")
            self._served, self._sha = None, None
            return
        if weights is None:
            return
        net = self._load(sha, weights)
        previous = self._current_name()
        self._served, self._sha = (net, version_name(sha)), sha
        log.info("now serving version %s (was %s)", version_name(sha), previous)

    def _follow_shadow(self, sha: str | None, weights: bytes | None) -> None:
        if sha == self._shadow_sha:
            return
        previous = self._shadow[1] if self._shadow else "none"
        if sha is None or weights is None:  # off, or unusable (logged when it was found so)
            self._shadow, self._shadow_sha = None, sha
        else:
            try:
                net = self._load(sha, weights)
            except model_lib.ModelLoadError:
                self._shadow, self._shadow_sha = None, sha
                raise
            self._shadow, self._shadow_sha = (net, version_name(sha)), sha
        log.info("shadow model: %s (was %s)", self._shadow[1] if self._shadow else "none", previous)

    def _load(self, sha: str, weights: bytes) -> torch.nn.Module:
        """The version *sha*'s *weights* checked, loaded and prepared; ModelLoadError (and the
        hash is not read again) if they are unusable."""
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
        return net


def _follow_live(ref: weakref.ref[LiveModel], interval: float) -> None:
    """A LiveModel's thread: a check every *interval* seconds while the LiveModel exists."""
    while True:
        time.sleep(interval)
        if (live := ref()) is None or live.closed:
            return
        live._check()
        del live
