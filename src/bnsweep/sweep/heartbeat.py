"""A running trial says it is alive, so a slow trial is never mistaken for a dead one.

Two beats: a ``heartbeat`` user attribute once per epoch (any storage), and a thread for the whole
trial (``beating``): Optuna's own heartbeat on PostgreSQL, whose staleness ``fail_stale_trials`` acts
on, or the ``heartbeat`` attribute every ``heartbeat_s`` on a journal (read by ``slots.is_lost``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import lightning.pytorch as pl
import optuna
from optuna.storages import BaseStorage

from bnsweep.defaults import HEARTBEAT_S
from bnsweep.sweep.storage import heartbeat_enabled

log = logging.getLogger("bnsweep.heartbeat")


class Heartbeat(pl.Callback):
    """Marks the trial alive once per epoch, so other machines can tell a slow trial from a dead one.

    (A heartbeat storage, PostgreSQL, also gets Optuna's own beats: see ``beating``.)
    """

    def __init__(self, storage: BaseStorage, trial: optuna.Trial) -> None:
        self.storage, self.trial_id = storage, trial._trial_id

    def beat(self) -> None:
        # retried elsewhere while this worker was paused: the worker drops its result at the end
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.beat()


@contextlib.contextmanager
def beating(storage: BaseStorage, trial: optuna.Trial, interval_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Beat from a thread for the whole trial (``with beating(...):``), not only once per epoch.

    PostgreSQL: Optuna's own heartbeat every ``heartbeat_s``. A journal: the ``heartbeat`` attribute
    every ``interval_s``, so a long epoch or a slow flush on another host is not taken for a dead
    worker (on this host the worker's PID decides: see ``slots.is_lost``).
    """
    native = heartbeat_enabled(storage)
    interval = storage.get_heartbeat_interval() if native else interval_s  # type: ignore[attr-defined]
    trial_id, stop = trial._trial_id, threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                if native:
                    storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
                else:
                    storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # it ended (or was retried elsewhere): nothing left to keep alive
            except Exception as e:  # a database hiccup or a full disk: the next beat may get through
                log.warning("heartbeat of trial %d not recorded: %s", trial.number, e)

    if native:
        beat_now(storage, trial_id)
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def beat_now(storage: BaseStorage, trial_id: int) -> None:
    try:
        storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
    except Exception as e:
        log.warning("heartbeat of trial id %d not recorded: %s", trial_id, e)
