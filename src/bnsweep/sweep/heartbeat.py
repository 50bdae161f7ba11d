"""A running trial says it is alive, so a slow trial is never mistaken for a dead one.

Two beats: a ``heartbeat`` user attribute once per epoch (any storage; the journal's only signal, read
by ``slots.is_lost``), and on a heartbeat storage (PostgreSQL) Optuna's own heartbeat from a thread for
the whole trial, whose staleness Optuna's ``fail_stale_trials`` acts on.
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

from bnsweep.sweep.storage import heartbeat_enabled

log = logging.getLogger("bnsweep.heartbeat")


class Heartbeat(pl.Callback):
    """Marks the trial alive once per epoch, so other machines can tell a slow trial from a dead one.

    (A heartbeat storage, PostgreSQL, also gets Optuna's own beats: see ``beating``.)
    """

    def __init__(self, storage: BaseStorage, trial: optuna.Trial) -> None:
        self.storage, self.trial_id = storage, trial._trial_id

    def beat(self) -> None:
        self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.beat()


@contextlib.contextmanager
def beating(storage: BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """Optuna's heartbeat for the whole trial (``with beating(...):``), from a thread; a no-op on a journal."""
    if not heartbeat_enabled(storage):
        yield
        return
    interval, trial_id, stop = storage.get_heartbeat_interval(), trial._trial_id, threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as e:  # a passing database hiccup: the next beat may get through
                log.warning("heartbeat of trial %d not recorded: %s", trial.number, e)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
