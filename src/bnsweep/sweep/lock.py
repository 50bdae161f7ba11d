"""One driver per sweep: an flock on ``<store>/optuna/<sweep>.lock`` that names its owner.

Two drivers of one sweep (two ``make sweep`` at once) would each end the other's cell runs, write two
``summary`` runs and race in ``top_up``. The lock is an flock, so the kernel releases it when its
driver dies however it dies (no stale lock file to delete by hand); the file's text (pid, host, start
time) is only there to tell the second driver whom it waits for. It serves one machine, like the
journal file; PostgreSQL sweeps driven from several machines need one driver by convention.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from bnsweep.errors import ConfigError


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
