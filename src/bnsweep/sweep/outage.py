"""A PostgreSQL storage that waits out a database restart instead of failing the sweep.

A maintenance window restarts the database under running workers. Every storage call that finds it
away (connection refused, "terminating connection due to administrator command", "the database
system is starting up") is retried with backoff for up to ``storage_wait_s``; each process says so
in one line per outage, not a traceback. After an outage nobody's heartbeat could be recorded, so for
``stale_after_s`` after it this process judges no trial stale (the living workers beat again
meanwhile): a database restart never retries a trial that was training all along.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from bnsweep.errors import redact

log = logging.getLogger("bnsweep.storage")
T = TypeVar("T")
BACKOFF_S = (0.5, 1.0, 2.0, 4.0)  # then every 5 s: a restarted database is noticed within 5 s
BACKOFF_MAX_S = 5.0

# The storage methods that talk to the database (Optuna's BaseStorage and heartbeat interface).
CALLS = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
         "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
         "get_study_system_attrs", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
         "create_new_trial", "set_trial_param", "get_trial_param", "set_trial_state_values",
         "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
         "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "get_best_trial",
         "record_heartbeat", "_get_stale_trial_ids",
         # what Optuna's _CachedStorage (which wraps every RDBStorage a study uses) calls directly
         "_create_new_trial", "_get_trials", "_set_trial_param", "_get_best_trial_id")


def database_away(e: BaseException | None) -> bool:
    """The error says the database is unreachable or restarting (not that a request was wrong)."""
    for _ in range(10):  # the chain: Optuna's StorageInternalError <- SQLAlchemy's <- psycopg's
        if e is None:
            return False
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if type(e).__module__.startswith("psycopg") and type(e).__name__ in ("OperationalError", "InterfaceError"):
            return True
        e = e.__cause__ or e.__context__
    return False


class PatientRDBStorage(RDBStorage):
    """Optuna's RDBStorage, each database call retried while the database is away (``storage_wait_s``)."""

    def __init__(self, url: str, wait_s: float, **kwargs: Any) -> None:
        self._wait_s, self._where = float(wait_s), redact(url.split("@")[-1].split("?")[0])
        self._outage_lock, self._local = threading.Lock(), threading.local()
        self._down_since: float | None = None  # monotonic time the current outage was first seen
        self._quiet_until = -math.inf  # no trial is judged stale before this (monotonic)
        self.outages = 0
        self._patiently(functools.partial(RDBStorage.__init__, self, url, **kwargs), "connect")

    def _patiently(self, call: Callable[[], T], name: str) -> T:
        if getattr(self._local, "inside", False):  # an outer call of ours retries the whole thing
            return call()
        self._local.inside = True
        try:
            attempt, first_error_at = 0, None
            while True:
                try:
                    out = call()
                except Exception as e:
                    if not database_away(e):
                        raise
                    now = time.monotonic()
                    first_error_at = first_error_at or now
                    self._went_away(e)
                    if now - first_error_at > self._wait_s:
                        raise
                    time.sleep(BACKOFF_S[attempt] if attempt < len(BACKOFF_S) else BACKOFF_MAX_S)
                    attempt += 1
                    continue
                if attempt:
                    self._came_back()
                return out
        finally:
            self._local.inside = False

    def _went_away(self, e: BaseException) -> None:
        with self._outage_lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self.outages += 1
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        log.warning("the Optuna storage (PostgreSQL at %s) does not answer (%s); waiting for it, retrying "
                    "for up to %.0f s (storage_wait_s)", self._where, redact(reason)[:200], self._wait_s)

    def _came_back(self) -> None:
        with self._outage_lock:
            if self._down_since is None:
                return
            self._down_since = None
            # nobody could beat while it was away: judge no trial stale until the living ones beat again
            self._quiet_until = time.monotonic() + (self.grace_period or 0)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_outage_lock"], state["_local"]
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._outage_lock, self._local = threading.Lock(), threading.local()
        self._patiently(functools.partial(RDBStorage.__setstate__, self, state), "connect")

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if self._down_since is not None or time.monotonic() < self._quiet_until:
            return []
        return self._patiently(lambda: RDBStorage._get_stale_trial_ids(self, study_id), "stale")

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        """Retried after an outage, a change that had committed before the connection broke is no error."""
        tries = [0]

        def call() -> bool:
            tries[0] += 1
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                if tries[0] > 1 and state.is_finished() and RDBStorage.get_trial(self, trial_id).state == state:
                    return True  # ours: it committed, the answer was lost with the connection
                raise

        done = self._patiently(call, "set_trial_state_values")
        if not done and tries[0] > 1 and state == TrialState.RUNNING:
            # a claim retried after an outage: if it was ours after all, a heartbeat makes it stale
            # (and retried) rather than RUNNING forever with nobody on it
            self.record_heartbeat(trial_id)
        return done


def _wrap(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def patient(self: PatientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._patiently(lambda: method(self, *args, **kwargs), name)

    return patient


for _name in CALLS:
    if _name not in PatientRDBStorage.__dict__:
        setattr(PatientRDBStorage, _name, _wrap(_name))
