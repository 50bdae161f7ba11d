"""The defaults that more than one part of bnsweep needs, each in one place.

The configs in ``conf/`` are what users read and override; the numbers below are read from them, so
a worker started by hand, a test or the report use exactly what ``bnsweep sweep`` would.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped in the package: works from any folder
SWEEP_DIR = str(Path(CONF_DIR) / "sweep")  # the built-in sweep definitions (a checkout's sweeps/ links here)

_SWEEP = OmegaConf.load(Path(CONF_DIR) / "run_sweep.yaml")
STORE_DIR: str = _SWEEP.tracking.store_dir  # MLflow's sqlite store, artifacts and the Optuna journals
HEARTBEAT_S: int = _SWEEP.heartbeat_s  # PostgreSQL storage: a running trial's heartbeat interval
STALE_AFTER_S: float = float(_SWEEP.stale_after_s)  # a running trial silent this long is retried
STORAGE_WAIT_S: float = float(_SWEEP.storage_wait_s)  # PostgreSQL away (a restart): retry this long, then stop
MAX_LOST: int = _SWEEP.max_lost  # a slot whose trial killed its worker this often is ended (poison)
STOP_WAIT_S: float = float(_SWEEP.stop_wait_s)  # a stopped driver waits this long for its workers
RESPAWNS_PER_WORKER: int = _SWEEP.respawns_per_worker  # new workers per worker when trials are left and none runs
REQUEST_RETRIES: int = _SWEEP.tracking.request_retries  # MLflow request retries and timeout (unless env sets them)
REQUEST_TIMEOUT_S: int = _SWEEP.tracking.request_timeout_s  # whole seconds (MLflow reads an int)
PROBE = _SWEEP.population_probe  # population=auto's candidates, margin and probe lengths

# Secrets a driver hands its workers by environment, never on their command lines (``ps`` shows those)
STORAGE_PASSWORD_ENV = "BNSWEEP_STORAGE_PASSWORD"  # the password of a postgresql:// storage URL
WORKER_ENV = (STORAGE_PASSWORD_ENV, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")  # what workers take from the driver

_SLURM = OmegaConf.load(Path(CONF_DIR) / "launcher" / "slurm.yaml")
SLURM_POLL_S: float = float(_SLURM.poll_s)  # squeue at most this often
SLURM_COMMAND_TIMEOUT_S: float = float(_SLURM.command_timeout_s)  # squeue/scancel given up after this long
_TRACKING = OmegaConf.load(Path(CONF_DIR) / "tracking" / "default.yaml")
FLUSH_S: float = float(_TRACKING.flush_s)  # a run's points reach the MLflow server at most this often
ANSWERED_S: float = float(_TRACKING.answered_s)  # a server that answered this recently is not probed again


def worker_count() -> int:
    """Local sweep workers when ``workers=null``: one per CPU core this process may use."""
    return len(os.sched_getaffinity(0))


def server_workers(value: int | None = None) -> int:
    """The local MLflow server's web workers: ``tracking.server_workers``, else one per CPU core."""
    value = _SWEEP.tracking.server_workers if value is None else value
    return int(value) if value is not None else worker_count()
