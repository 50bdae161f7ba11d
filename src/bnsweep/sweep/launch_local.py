"""Local sweep workers, forked from a server that has already imported torch, Lightning and MLflow.

Those imports cost ~7 s per process on a 2-core machine. The driver starts the fork server first
thing, so the cost overlaps its own start-up, and each worker (or respawn) then starts in about a
second. A forked worker runs exactly ``bnsweep worker``'s ``main``; cluster jobs run that
command itself. No torch, Lightning or MLflow here: importing this module must stay cheap.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing import forkserver
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from bnsweep.defaults import WORKER_ENV, worker_count
from bnsweep.tracking.server import free_port

_CONTEXT = multiprocessing.get_context("forkserver")


def start_preloading() -> None:
    """Start the fork server now; it imports the worker while the caller does other work."""
    _CONTEXT.set_forkserver_preload(["bnsweep.sweep.worker"])
    forkserver.ensure_running()


def rank_env(rank: int, ranks: int, port: int) -> dict[str, str]:
    """Environment of rank ``rank`` of a ``ranks``-process DDP worker on one node (empty for one rank).

    Lightning sees LOCAL_RANK and so never starts processes itself: the same K processes serve
    every trial of the worker, started here or by SLURM (whose own variables are hidden, so that
    Lightning does not take the job's task count for the DDP world).
    """
    if ranks <= 1:
        return {}
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "NODE_RANK": "0", "SLURM_NTASKS": "",
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}  # all ranks on this node


def apply_env(env: dict[str, str]) -> None:
    """Set ``env`` in this process; an empty value removes the variable."""
    for key, value in env.items():
        if value:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)


def _run(argv: list[str], log_path: str, env: dict[str, str]) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    apply_env(env)
    from bnsweep.sweep.worker import main

    main(argv)


def spawn_worker(argv: list[str], log_path: str | Path, env: dict[str, str] | None = None) -> BaseProcess:
    """Start one worker with ``bnsweep worker`` arguments; its output goes to ``log_path``.

    The fork server started before the driver set its credentials and request limits: a worker gets
    those (``WORKER_ENV``) from this process, as a SLURM job inherits them from the submitting one.
    """
    start_preloading()  # no-op when already running
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ} | dict(env or {})
    proc = _CONTEXT.Process(target=_run, args=(list(argv), str(log_path), env), daemon=True)
    proc.start()
    return proc


class LocalLauncher:
    """Config ``launcher=local`` (the default): workers as processes on this machine."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or worker_count()
        self.procs: list[BaseProcess] = []

    def start(self, argv: list[str], log_dir: Path, first: int, count: int, ranks: int = 1) -> None:
        """Start workers ``first .. first+count-1`` (the number is their sampler seed offset)."""
        for k in range(first, first + count):
            port = free_port() if ranks > 1 else 0
            for r in range(ranks):
                name = f"worker-{k}.log" if ranks == 1 else f"worker-{k}-rank{r}.log"
                self.procs.append(spawn_worker([*argv, "--seed-offset", str(k)], log_dir / name,
                                               rank_env(r, ranks, port)))

    def alive(self) -> int:
        return sum(p.is_alive() for p in self.procs)

    def pause(self, timeout: float) -> None:
        """Return after ``timeout`` seconds, or at once when a worker ends."""
        alive = [p.sentinel for p in self.procs if p.is_alive()]
        if alive:
            wait(alive, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM each worker: it gives its trial back and ends its MLflow run KILLED (worker.main)."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` s in all for stopped workers to end; SIGKILL any still there after it."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)

    def failed(self) -> int:
        return sum(bool(p.exitcode) for p in self.procs)

    def describe(self) -> str:
        return f"{len(self.procs)} local worker process(es)"
