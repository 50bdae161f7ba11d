"""The sweep driver: ``bnsweep sweep sweep=default`` (or ``make sweep SWEEP=default``).

Expands the grid into cells (one Optuna study ``<sweep>/<cell>`` each, in one storage), makes sure
an MLflow server is there (a parent run per cell), enqueues the missing trials, starts W workers
(local processes, or ``launcher=slurm``: a SLURM job array, see launch_slurm.py), shows one progress
bar read from the storage, and ends with the summary table. Running it again resumes: lost trials
are retried, finished ones are never repeated.

This module is the command's flow; what it holds about a sweep is ``state.Sweep``, whose concerns live in
``cells``, ``recovery``, ``launch``, ``progress``, ``summary`` and ``usage``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

import hydra
from omegaconf import DictConfig

from bnsweep.defaults import CONF_DIR
from bnsweep.errors import check_int, run_app
from bnsweep.sweep import files, table
from bnsweep.sweep.launch_local import LocalLauncher
from bnsweep.sweep.lock import database_owner, holding, holding_database, lock_path, owner
from bnsweep.sweep.state import Sweep, open_sweep
from bnsweep.tracking.runs import quick_requests

__all__ = ["Sweep", "drive", "main", "open_sweep", "run"]

@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (kill, a job's end) stops the driver as Ctrl-C does: workers stopped, runs ended."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(cfg: DictConfig) -> list[dict]:
    quick_requests(check_int("tracking.request_retries", cfg.tracking.request_retries, 0),
                   check_int("tracking.request_timeout_s", cfg.tracking.request_timeout_s, 1))
    sweep = open_sweep(cfg)
    lock = lock_path(sweep.store_dir, sweep.spec.name)
    if cfg.action != "run" and (who := owner(lock) or in_database(sweep)):
        return sweep.snapshot(who)
    try:
        with holding(lock, sweep.spec.name), holding_database(sweep.storage_url, sweep.spec.name), \
                stop_on_sigterm():
            return drive(cfg, sweep)
    except KeyboardInterrupt:  # stop_workers has said what happened and how to resume
        sys.exit(130)


def in_database(sweep: Sweep) -> str | None:
    """A PostgreSQL sweep's driver on another host: who holds the sweep's lock in the database."""
    return database_owner(sweep.storage_url, sweep.spec.name)


def drive(cfg: DictConfig, sweep: Sweep) -> list[dict]:
    """The sweep's one driver (it holds the sweep's lock): prepare, run the workers, summarize."""
    sweep.prepare()
    print(f"dashboard: {sweep.dashboard}", file=sys.stderr)
    local = isinstance(sweep.launcher, LocalLauncher)
    if cfg.action == "run":
        sweep.prepare_data()
        n_workers = sweep.workers
        if not local and not sweep.launcher.wait:
            sweep.spawn(0, n_workers)
            from bnsweep.sweep.launch_slurm import reattach_hint

            print(f"submitted {sweep.launcher.describe()}; follow it with:\n  {reattach_hint()}", file=sys.stderr)
            return []
        with sweep.monitored():
            wall = sweep.run_workers(n_workers)
        t = sweep.timing()
        if t["trials"]:
            print(f"{t['trials']} trials ran in {wall:.1f} s with {n_workers} workers; orchestration overhead "
                  f"{(n_workers * wall - t['fit_s'] - t['eval_s']) / t['trials']:.2f} s per trial "
                  "(beyond training and testing; worker start-up included)",
                  file=sys.stderr)
    elif not local and sweep.launcher.attach(sweep.log_dir):  # status: watch the running jobs to their end
        sweep.run_workers(sweep.workers, attach=True)
    rows = sweep.finish()
    print("\n" + table.to_markdown(rows, sweep.spec.target_acc))
    left = sum(r["running"] for r in rows)
    print(f"Table: reports/{sweep.spec.name}/summary.{{md,csv}}; dashboard: "
          f"{sweep.dashboard}" + (f"\n{left} trials left: run the same command again to resume." if left else ""))
    return rows


@files.finding_files
@hydra.main(config_path=CONF_DIR, config_name="run_sweep", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """``bnsweep sweep``."""
    run_app(run, cfg)


if __name__ == "__main__":
    main()
