"""Where a sweep's state lives: one Optuna storage, one study per cell (``<sweep>/<cell>``).

A journal file serves one machine (several processes); PostgreSQL serves several machines and has
Optuna's own heartbeats. Driver, workers and the report share state only through this storage.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from bnsweep.defaults import HEARTBEAT_S, STALE_AFTER_S, STORAGE_WAIT_S
from bnsweep.errors import ConfigError
from bnsweep.sweep.outage import PatientRDBStorage

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger("bnsweep.storage")


def default_storage(store_dir: str | Path, sweep: str) -> str:
    return str(Path(store_dir).resolve() / "optuna" / f"{sweep.replace('/', '_')}.journal")


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S,
                 wait_s: float = STORAGE_WAIT_S) -> BaseStorage:
    """A JournalStorage file (one machine, several processes) or an RDB URL (several machines).

    An RDB storage beats every ``heartbeat_s`` while a trial runs; one silent for ``stale_after_s``
    is failed and re-enqueued by ``RetryHeartbeatStaleTrialCallback`` (see ``recover_lost``). It waits
    up to ``wait_s`` for a database that is away (a restart), retrying (sweep/outage.py).
    """
    if "://" in url and not url.startswith("journal://"):
        if url.startswith("sqlite"):
            raise ConfigError(f"storage={url!r} is not allowed: SQLite breaks with several worker processes; "
                              "use a journal file path (the default) or postgresql://...")
        with warnings.catch_warnings():  # "experimental since 2.8": it is what Optuna offers for this
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return PatientRDBStorage(
                url, wait_s, heartbeat_interval=int(heartbeat_s), grace_period=int(stale_after_s),
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                engine_kwargs={"pool_pre_ping": True})
    path = Path(url.removeprefix("journal://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileOpenLock(str(path))
    repair_journal(path, lock)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def _torn_tail(data: bytes) -> int | None:
    """Where a journal's torn last record starts (a crash or a full disk mid-append), or None if intact."""
    if not data:
        return None
    cut = data.rfind(b"\n", 0, len(data) - 1) + 1 if data.endswith(b"\n") else data.rfind(b"\n") + 1
    if not data.endswith(b"\n"):
        return cut
    try:
        json.loads(data[cut:])
    except ValueError:
        return cut
    return None


def repair_journal(path: Path, lock: JournalFileOpenLock) -> None:
    """Cut a journal's torn last record, keeping a copy of the file as it was (``<journal>.torn-<n>``).

    Appends are whole records under the journal's lock, so a torn tail is an append that never
    finished: its trial's last change is lost and the trial looks as it did before it (a RUNNING
    trial of a dead worker is then retried). Left in place, the next append would glue a record to it
    and every later read would fail with JSONDecodeError.
    """
    if not path.exists():
        return
    lock.acquire()
    try:
        data = path.read_bytes()
        cut = _torn_tail(data)
        if cut is None:
            return
        n = 1
        while (backup := path.with_name(f"{path.name}.torn-{n}")).exists():
            n += 1
        shutil.copy2(path, backup)
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.flush()
        log.warning("journal %s had a torn last record (%d bytes, from a crash or a full disk): cut it; "
                    "the file as it was is kept as %s", path, len(data) - cut, backup.name)
    finally:
        lock.release()


def sweep_studies(storage: BaseStorage, sweep: str) -> list[optuna.Study]:
    names = sorted(n for n in optuna.get_all_study_names(storage) if n.startswith(f"{sweep}/"))
    return [optuna.load_study(study_name=n, storage=storage) for n in names]


def heartbeat_enabled(storage: BaseStorage) -> bool:
    """A storage with Optuna's heartbeats (PostgreSQL): it retries stale trials itself, atomically."""
    return isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None
