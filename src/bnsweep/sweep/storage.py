"""Where a sweep's state lives: one Optuna storage, one study per cell (``<sweep>/<cell>``).

A journal file serves one machine (several processes); PostgreSQL serves several machines and has
Optuna's own heartbeats. Driver, workers and the report share state only through this storage.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from bnsweep.defaults import HEARTBEAT_S, STALE_AFTER_S
from bnsweep.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def default_storage(store_dir: str | Path, sweep: str) -> str:
    return str(Path(store_dir).resolve() / "optuna" / f"{sweep.replace('/', '_')}.journal")


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> BaseStorage:
    """A JournalStorage file (one machine, several processes) or an RDB URL (several machines).

    An RDB storage beats every ``heartbeat_s`` while a trial runs; one silent for ``stale_after_s``
    is failed and re-enqueued by ``RetryHeartbeatStaleTrialCallback`` (see ``recover_lost``).
    """
    if "://" in url and not url.startswith("journal://"):
        if url.startswith("sqlite"):
            raise ConfigError(f"storage={url!r} is not allowed: SQLite breaks with several worker processes; "
                              "use a journal file path (the default) or postgresql://...")
        with warnings.catch_warnings():  # "experimental since 2.8": it is what Optuna offers for this
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url, heartbeat_interval=int(heartbeat_s), grace_period=int(stale_after_s),
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                engine_kwargs={"pool_pre_ping": True})
    path = Path(url.removeprefix("journal://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def sweep_studies(storage: BaseStorage, sweep: str) -> list[optuna.Study]:
    names = sorted(n for n in optuna.get_all_study_names(storage) if n.startswith(f"{sweep}/"))
    return [optuna.load_study(study_name=n, storage=storage) for n in names]


def heartbeat_enabled(storage: BaseStorage) -> bool:
    """A storage with Optuna's heartbeats (PostgreSQL): it retries stale trials itself, atomically."""
    return isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None
