"""One driver per sweep: an flock on ``<store>/optuna/<sweep>.lock`` that names its owner, and on
PostgreSQL an advisory lock in the database itself.

Two drivers of one sweep (two ``make sweep`` at once) would each end the other's cell runs, write two
``summary`` runs and race in ``top_up``. The flock is released by the kernel when its driver dies however
it dies (no stale lock file to delete by hand); the file's text (pid, host, start time) is only there to
tell the second driver whom it waits for. It serves one machine. A PostgreSQL sweep can be driven from
two login nodes, so its driver also holds ``pg_try_advisory_lock`` on a key derived from the sweep's
name, on a connection of its own for its whole life: PostgreSQL releases it when that connection ends
(the driver died, or its host did), and names the holder (application_name) to the second driver.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnsweep.errors import ConfigError

log = logging.getLogger("bnsweep.lock")
KEEP_S = 5.0  # the lock's connection is checked this often; after a database restart it is taken again


def lock_path(store_dir: str | Path, sweep: str) -> Path:
    return Path(store_dir).resolve() / "optuna" / f"{sweep.replace('/', '_')}.lock"


def owner(path: Path) -> str | None:
    """Who holds the sweep's lock ("pid 123 on host x since ..."), or None if nobody does."""
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return path.read_text().strip() or "another process"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def holding(path: Path, sweep: str) -> Iterator[None]:
    """Hold the sweep's lock while the block runs; a second driver gets one line saying who has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"sweep={sweep}: another driver runs it ({path.read_text().strip() or 'unknown'}); wait for it "
                "to end, or watch it with action=status") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        os.close(fd)  # closing releases the flock


def database_key(sweep: str) -> int:
    """The sweep's advisory-lock key: 64 bits of a hash of its name (signed, as PostgreSQL's bigint)."""
    return int.from_bytes(hashlib.sha256(f"bnsweep sweep {sweep}".encode()).digest()[:8], "big", signed=True)


def is_postgresql(url: str) -> bool:
    return re.match(r"^postgres(ql)?(\+\w+)?://", url) is not None


def _conninfo(url: str) -> str:
    return re.sub(r"^postgres(ql)?\+\w+://", "postgresql://", url)


def _connect(url: str, name: str) -> Any:
    import psycopg

    return psycopg.connect(_conninfo(url), autocommit=True, application_name=name[:63], connect_timeout=10)


_HOLDER = """SELECT a.application_name, a.backend_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::bigint = %s AND l.objid::bigint = %s"""


def _holder(conn: Any, key: int) -> str | None:
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(_HOLDER, (unsigned >> 32, unsigned & 0xFFFFFFFF)).fetchone()
    if row is None:
        return None
    name, since = row
    who = name.removeprefix("bnsweep driver: ") if name.startswith("bnsweep driver: ") else (name or "a session")
    return f"{who} since {since:%Y-%m-%d %H:%M:%S}" if since else who


def database_owner(url: str, sweep: str) -> str | None:
    """Who holds the sweep's lock in the database ("pid 123 on host x since ..."), or None."""
    if not is_postgresql(url):
        return None
    with contextlib.closing(_connect(url, "bnsweep status")) as conn:
        return _holder(conn, database_key(sweep))


class DatabaseLock:
    """The sweep's advisory lock, held on a dedicated connection that a thread keeps alive."""

    def __init__(self, url: str, sweep: str) -> None:
        self.url, self.sweep, self.key = url, sweep, database_key(sweep)
        self.name = f"bnsweep driver: pid {os.getpid()} on {socket.gethostname()}"
        self.conn: Any = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._keep, name="sweep-lock", daemon=True)

    def _take(self) -> bool:
        self.conn = _connect(self.url, self.name)
        return bool(self.conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0])

    def acquire(self) -> None:
        if not self._take():
            who = _holder(self.conn, self.key) or "unknown"
            self.conn.close()
            raise ConfigError(f"sweep={self.sweep}: another driver runs it ({who}, lock held in the Optuna "
                              "storage's database); wait for it to end, or watch it with action=status")
        self.thread.start()

    def _keep(self) -> None:
        """A database restart ends the lock's connection (and the lock): take it again once it is back."""
        while not self.stop.wait(KEEP_S):
            try:
                self.conn.execute("SELECT 1")
                continue
            except Exception:
                with contextlib.suppress(Exception):
                    self.conn.close()
            while not self.stop.is_set():  # the storage says so in its own line; this waits quietly
                try:
                    if not self._take():
                        log.warning("sweep=%s: after the database came back, another driver (%s) holds the "
                                    "sweep's lock; stop one of the two", self.sweep, _holder(self.conn, self.key))
                    break
                except Exception:
                    self.stop.wait(KEEP_S)

    def release(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=KEEP_S + 15)
        with contextlib.suppress(Exception):
            self.conn.close()  # ending the session releases the lock


@contextlib.contextmanager
def holding_database(url: str, sweep: str) -> Iterator[None]:
    """Hold the sweep's advisory lock while the block runs (PostgreSQL storages; others: nothing to hold)."""
    if not is_postgresql(url):
        yield
        return
    lock = DatabaseLock(url, sweep)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
