"""What the driver holds about one sweep, and opening it from ``conf/run_sweep.yaml``.

``Sweep`` joins the driver's concerns, each in its own module: ``cells`` (studies and parent runs),
``recovery`` (lost trials, runs completed from the storage), ``launch`` (data, the workers' arguments),
``progress`` (running the workers with one progress bar, stopping them), ``summary`` (the table and the
summary run) and ``usage`` (system metrics, time per trial).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from bnsweep.config import instantiate
from bnsweep.defaults import MAX_LOST, RESPAWNS_PER_WORKER, STOP_WAIT_S, STORAGE_WAIT_S, worker_count
from bnsweep.errors import ConfigError, check_int, check_range
from bnsweep.sweep import table
from bnsweep.sweep.cells import Cells
from bnsweep.sweep.definition import SweepSpec, parse
from bnsweep.sweep.launch import Launch
from bnsweep.sweep.launch_local import LocalLauncher
from bnsweep.sweep.progress import Progress
from bnsweep.sweep.recovery import Recovery
from bnsweep.sweep.storage import default_storage, open_storage, sweep_studies
from bnsweep.sweep.summary import Summary
from bnsweep.sweep.usage import Usage
from bnsweep.tracking.dashboard import runs_table_url, set_view
from bnsweep.tracking.runs import artifact_root, get_or_create_experiment
from bnsweep.tracking.server import connect

log = logging.getLogger("bnsweep.sweep")


@dataclass
class Sweep(Cells, Recovery, Launch, Progress, Summary, Usage):
    """Everything the driver holds about one sweep."""

    spec: SweepSpec
    storage_url: str
    uri: str
    store_dir: Path
    stale_after_s: float
    workers: int
    launcher: Any  # LocalLauncher or launch_slurm.SlurmLauncher
    heartbeat_s: int
    max_lost: int = MAX_LOST  # conf/run_sweep.yaml; see slots.poison_slots
    stop_wait_s: float = STOP_WAIT_S
    respawns_per_worker: int = RESPAWNS_PER_WORKER
    storage_wait_s: float = STORAGE_WAIT_S

    def __post_init__(self) -> None:
        self.storage = open_storage(self.storage_url, self.heartbeat_s, self.stale_after_s, self.storage_wait_s)
        self.client = MlflowClient(self.uri)
        self.experiment = f"sweep-{self.spec.name}"
        self.experiment_id = get_or_create_experiment(
            self.client, self.experiment, artifact_root(self.uri, self.store_dir))

    @property
    def studies(self) -> list[optuna.Study]:
        """This sweep's cell studies; ``prepare`` keeps them, so polling reads only new journal lines."""
        return getattr(self, "_studies", None) or sweep_studies(self.storage, self.spec.name)

    @functools.cached_property
    def dashboard(self) -> str:
        """The link to this sweep's runs table: cell runs with the table's answers as sortable columns.

        Trials are filtered out (the search box says so): sorted on best val acc they would mix with the
        cells; each cell run lists its trials, and clearing the search shows them all.
        """
        set_view(self.client, self.experiment_id, table.METRIC_COLUMNS, "best_val_acc",
                 search="tags.`bnsweep.role` != 'trial'")
        return runs_table_url(self.uri, self.experiment_id)

    @property
    def log_dir(self) -> Path:
        path = self.store_dir / "sweeps" / self.spec.name.replace("/", "_")
        path.mkdir(parents=True, exist_ok=True)
        return path


def open_sweep(cfg: DictConfig) -> Sweep:
    raw = OmegaConf.to_container(cfg.sweep, resolve=True)
    if cfg.get("population") is not None:  # how to run, not what: a command-line choice
        raw["population"] = cfg.population
    spec = parse(raw, list(cfg.overrides or []))
    workers = cfg.workers or worker_count()
    if workers < 1:
        raise ConfigError(f"workers={workers} is not allowed; it must be >= 1")
    limits = {"max_lost": check_int("max_lost", cfg.max_lost, 1),
              "stop_wait_s": float(check_range("stop_wait_s", cfg.stop_wait_s, 0)),
              "respawns_per_worker": check_int("respawns_per_worker", cfg.respawns_per_worker, 0),
              "storage_wait_s": float(check_range("storage_wait_s", cfg.storage_wait_s, 0))}
    launcher = instantiate(cfg.launcher) if cfg.get("launcher") else LocalLauncher(workers)
    store = Path(cfg.tracking.store_dir).resolve()
    url = cfg.storage or default_storage(store, spec.name)
    if not isinstance(launcher, LocalLauncher) and "://" not in url:
        log.warning("launcher=%s with a journal file (%s): every node must see it on a shared filesystem "
                    "(else set storage=postgresql://...)", cfg.launcher.get("_target_", "?").split(".")[-1], url)
    return Sweep(spec, url, connect(cfg.tracking), store, float(cfg.stale_after_s),
                 getattr(launcher, "workers", workers), launcher, int(cfg.heartbeat_s), **limits)
