"""Where a sweep's state lives: one Optuna storage, one study per cell (``<sweep>/<cell>``).

A journal file serves one machine (several processes); PostgreSQL serves several machines and has
Optuna's own heartbeats. Driver, workers and the report share state only through this storage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from bnsweep.defaults import HEARTBEAT_S, STALE_AFTER_S, STORAGE_PASSWORD_ENV, STORAGE_WAIT_S
from bnsweep.errors import ConfigError, check_name
from bnsweep.sweep.outage import PatientRDBStorage

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger("bnsweep.storage")


RECORD = b'{"op_code":'  # how every journal record starts (Optuna writes compact JSON, op_code first)


def default_storage(store_dir: str | Path, sweep: str) -> str:
    check_name("sweep.name", sweep)
    return str(Path(store_dir).resolve() / "optuna" / f"{sweep}.journal")


def for_workers(url: str) -> tuple[str, dict[str, str]]:
    """The storage URL for a worker's command line, without its password, and the environment that carries it."""
    if "://" not in url or url.startswith("journal://"):
        return url, {}
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.password is None:
        return url, {}
    bare = parsed._replace(password=None).render_as_string(hide_password=False)
    return bare, {STORAGE_PASSWORD_ENV: str(parsed.password)}


def with_password(url: str) -> str:
    """A worker's storage URL with the password its driver passed by environment (``for_workers``)."""
    password = os.environ.get(STORAGE_PASSWORD_ENV)
    if not password or "://" not in url or url.startswith("journal://"):
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return url if parsed.password is not None else parsed.set(password=password).render_as_string(hide_password=False)


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
                with_password(url), wait_s, heartbeat_interval=int(heartbeat_s), grace_period=int(stale_after_s),
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                engine_kwargs={"pool_pre_ping": True})
    path = Path(url.removeprefix("journal://"))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # the sweep's results: this user's only
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    lock = JournalFileOpenLock(str(path))
    repair_journal(path, lock)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def _record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _whole(line: bytes) -> bytes | None:
    """A journal line, or the whole record an append glued to a torn one before it; None if neither."""
    if _record(line):
        return line
    start = line.find(RECORD, 1)
    while start > 0:
        if _record(line[start:]):
            return line[start:]
        start = line.find(RECORD, start + 1)
    return None


def mend(data: bytes) -> tuple[bytes, int, int | None]:
    """(the journal without its torn records, how many were torn, the first damaged line or None).

    A torn record is an append that never finished (a crash, a full disk): the file's last line without
    its newline, or a prefix the next append was glued to, anywhere in the file. A line that is neither a
    record nor ends in one is damage of another kind: nothing safe to cut, so it is reported.
    """
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    kept, torn = [], int(bool(tail))
    for i, line in enumerate(lines):
        whole = _whole(line)
        if whole is None and all(_whole(rest) is None for rest in lines[i + 1:]):
            torn += len(lines) - i  # nothing whole after it: a torn tail (and its newline)
            break
        if whole is None:
            return data, torn, i + 1
        torn += whole is not line
        kept.append(whole)
    return b"".join(k + b"\n" for k in kept), torn, None


def repair_journal(path: Path, lock: JournalFileOpenLock) -> None:
    """Cut a journal's torn records, keeping a copy of the file as it was (``<journal>.torn-<n>``).

    Appends are whole records under the journal's lock, so a torn record is an append that never
    finished: its trial's last change is lost and the trial looks as it did before it (a RUNNING
    trial of a dead worker is then retried). Left in place, every later read would fail with
    JSONDecodeError. Damage of another kind is refused with one line naming the copy.
    """
    if not path.exists():
        return
    lock.acquire()
    try:
        data = path.read_bytes()
        mended, torn, damaged = mend(data)
        if not torn and damaged is None:
            return
        n = 1
        while (backup := path.with_name(f"{path.name}.torn-{n}")).exists():
            n += 1
        shutil.copy2(path, backup)
        if damaged is not None:
            raise ConfigError(f"storage={path}: line {damaged} of the journal is damaged (not an unfinished write "
                              f"that can be cut), so the sweep cannot be read safely; the file is unchanged and "
                              f"copied to {backup}; restore it from a backup or run the sweep under a new sweep.name")
        with open(path, "r+b") as f:
            f.write(mended)
            f.truncate(len(mended))
            f.flush()
            os.fsync(f.fileno())
        what = "a torn last record" if data.startswith(mended) else f"{torn} torn record(s), inside the file too"
        log.warning("journal %s had %s (from a crash or a full disk): cut; the file as it was is kept as %s",
                    path, what, backup.name)
    finally:
        lock.release()


def sweep_studies(storage: BaseStorage, sweep: str) -> list[optuna.Study]:
    names = sorted(n for n in optuna.get_all_study_names(storage) if n.startswith(f"{sweep}/"))
    return [optuna.load_study(study_name=n, storage=storage) for n in names]


def heartbeat_enabled(storage: BaseStorage) -> bool:
    """A storage with Optuna's heartbeats (PostgreSQL): it retries stale trials itself, atomically."""
    return isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None
