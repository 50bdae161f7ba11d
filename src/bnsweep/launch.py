"""Local sweep workers, forked from a server that has already imported torch, Lightning and MLflow.

Those imports cost ~7 s per process on a 2-core machine. The driver starts the fork server first
thing, so the cost overlaps its own start-up, and each worker (or respawn) then starts in about a
second. A forked worker runs exactly ``python -m bnsweep.worker``'s ``main``; cluster jobs run that
command itself. Stdlib only: importing this module must stay cheap.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing import forkserver
from multiprocessing.process import BaseProcess
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")


def start_preloading() -> None:
    """Start the fork server now; it imports the worker while the caller does other work."""
    _CONTEXT.set_forkserver_preload(["bnsweep.worker"])
    forkserver.ensure_running()


def _run(argv: list[str], log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    from bnsweep.worker import main

    main(argv)


def spawn_worker(argv: list[str], log_path: str | Path) -> BaseProcess:
    """Start one worker with ``python -m bnsweep.worker`` arguments; its output goes to ``log_path``."""
    start_preloading()  # no-op when already running
    proc = _CONTEXT.Process(target=_run, args=(list(argv), str(log_path)), daemon=True)
    proc.start()
    return proc
