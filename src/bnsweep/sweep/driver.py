"""The sweep driver: ``bnsweep sweep sweep=default`` (or ``make sweep SWEEP=default``).

Expands the grid into cells (one Optuna study ``<sweep>/<cell>`` each, in one storage), makes sure
an MLflow server is there (a parent run per cell), enqueues the missing trials, starts W workers
(local processes, or ``launcher=slurm``: a SLURM job array, see launch_slurm.py), shows one progress
bar read from the storage, and ends with the summary table. Running it again resumes: lost trials
are retried, finished ones are never repeated.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from tqdm import tqdm

from bnsweep.config import compose, instantiate
from bnsweep.defaults import CONF_DIR, worker_count
from bnsweep.errors import ConfigError, TrackingError, run_app
from bnsweep.sweep import changes, files, table
from bnsweep.sweep.definition import SweepSpec, cell_labels, parse
from bnsweep.sweep.launch_local import LocalLauncher
from bnsweep.sweep.lock import holding, lock_path, owner
from bnsweep.sweep.slots import counts, live, recover_study, retried, trial_tags
from bnsweep.sweep.storage import default_storage, open_storage, sweep_studies
from bnsweep.tracking import outbox
from bnsweep.tracking.dashboard import runs_table_url, set_view
from bnsweep.tracking.runs import (
    RUN_NAME_TAG,
    RunTracker,
    artifact_root,
    cell_run_name,
    complete_trial_runs,
    get_or_create_experiment,
    mark_killed,
    quick_requests,
    summary_run,
    trial_run_name,
)
from bnsweep.tracking.server import connect
from bnsweep.tracking.system import system_metrics

log = logging.getLogger("bnsweep.sweep")
STOP_WAIT_S = 60  # a stopped driver waits this long for its workers to give their trials back


def run_name(t: optuna.trial.FrozenTrial) -> str:
    """A trial's MLflow run name, as its worker gave it (``trial_run_name``): a rebuilt run gets the same."""
    return trial_run_name(t.params, t.user_attrs.get("seed"), t.user_attrs.get("repeat"), "retry_of" in t.user_attrs)


@dataclass
class Sweep:
    """Everything the driver holds about one sweep."""

    spec: SweepSpec
    storage_url: str
    uri: str
    store_dir: Path
    stale_after_s: float
    workers: int
    launcher: Any  # LocalLauncher or launch_slurm.SlurmLauncher
    heartbeat_s: int

    def __post_init__(self) -> None:
        self.storage = open_storage(self.storage_url, self.heartbeat_s, self.stale_after_s)
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

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        """Create or check each cell's study and parent run; enqueue every missing trial."""
        changes.check(self.storage, self.spec, self.storage_url)
        studies = []
        for i, cell in enumerate(self.spec.cells()):
            study = optuna.create_study(storage=self.storage, study_name=self.spec.study_name(cell),
                                        direction="maximize", load_if_exists=True)
            old = study.user_attrs.get("overrides")
            if old is not None and old != cell.overrides:
                raise ConfigError(
                    f"sweep {self.spec.name!r} changed since its studies were created (cell {cell.name}: "
                    f"{old} -> {cell.overrides}); give it a new name (sweep.name=...) or delete "
                    f"{self.storage_url}")
            parent = study.user_attrs.get("mlflow_parent_run_id")
            if parent is None:
                run = self.client.create_run(self.experiment_id, run_name=cell_run_name(
                    cell_labels(cell.values).values()), tags={
                    "bnsweep.sweep": self.spec.name, "bnsweep.cell": cell.name, "bnsweep.role": "cell",
                    "optuna.study": study.study_name})
                parent = run.info.run_id
                RunTracker.for_run(self.client, parent).log(
                    params={**{k: v for k, v in cell.values.items()}, "overrides": " ".join(cell.overrides)})
            else:
                self.client.update_run(parent, status="RUNNING")
            attrs = {**self.spec.to_attrs(), "cell": cell.name, "grid": cell.values, "order": i,
                     "overrides": cell.overrides, "mlflow_parent_run_id": parent,
                     "mlflow_experiment": self.experiment, "store_dir": str(self.store_dir)}
            for k, v in attrs.items():
                if study.user_attrs.get(k) != v:
                    study.set_user_attr(k, v)
            studies.append(study)
        self._studies = studies
        self.recover()

    def recover(self) -> int:
        """Retry trials whose worker died; mark their MLflow runs KILLED. Returns trials enqueued."""
        added = 0
        for study in self.studies:
            lost, n = recover_study(self.storage, study, self.stale_after_s)
            if lost:
                try:
                    mark_killed(self.client, self.experiment_id, study.study_name, lost, any_status=True)
                except Exception as e:  # MLflow away: finish() ends them once it is back
                    log.warning("MLflow did not answer (%s); the lost trials' runs are ended later", e)
            added += n
        return added

    def complete_runs(self) -> int:
        """Each finished trial's MLflow run made whole from the storage (see ``complete_trial_runs``):
        what a worker could not send while MLflow was away or slow is completed here."""
        changed = outbox.replay(self.client, self.store_dir)  # first: the runs' own points, where kept
        for study in self.studies:
            parent = study.user_attrs["mlflow_parent_run_id"]
            gone = retried(trials := study.get_trials(deepcopy=False))
            done = [(trial_tags(self.spec.name, study, t) | {"mlflow.parentRunId": parent, RUN_NAME_TAG: run_name(t)},
                     {k: str(v) for k, v in t.params.items()}, t.user_attrs.get("metrics") or {}, "FINISHED")
                    for t in trials if live(t, gone) and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    and not t.user_attrs.get("skipped")]  # a skipped slot never trained: no run to complete
            changed += complete_trial_runs(self.client, self.experiment_id, study.study_name, done)
        if changed:
            log.info("completed %d trial run(s) in MLflow from the storage", changed)
        return changed

    def prepare_data(self) -> None:
        """Decode each dataset once here, so parallel workers only read the cache."""
        seen = set()
        for cell in self.spec.cells():
            data = compose("train", cell.overrides).data
            key = OmegaConf.to_yaml(data, resolve=True)
            if key not in seen:
                seen.add(key)
                instantiate(data).prepare_data()

    # ------------------------------------------------------------------ workers

    def worker_args(self) -> list[str]:
        """Arguments of ``bnsweep worker``: the same worker on this machine or a cluster."""
        return ["--storage", self.storage_url, "--sweep", self.spec.name, "--tracking-uri", self.uri,
                "--threads", "1", "--heartbeat-s", str(self.heartbeat_s), "--stale-after-s", str(self.stale_after_s)]

    @functools.cached_property
    def ranks(self) -> int:
        """Processes per worker: ``trainer.devices`` under a DDP strategy (the first cell's), else 1."""
        trainer = compose("train", self.spec.cells()[0].overrides).trainer
        strategy = trainer.get("strategy", "auto")
        name = strategy if isinstance(strategy, str) else strategy.get("_target_", "")
        return int(trainer.devices) if "ddp" in name.lower() and isinstance(trainer.devices, int) else 1

    def spawn(self, first: int, count: int) -> None:
        self.launcher.start(self.worker_args(), self.log_dir, first, count, self.ranks)

    def totals(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for study in self.studies:
            for k, v in counts(study).items():
                c[k] = c.get(k, 0) + v
        return c

    def run_workers(self, n_workers: int, quiet: bool = False, attach: bool = False) -> float:
        """Run the workers to the end with one progress bar; return the wall time.

        ``attach``: start none, watch those an earlier command started (``launcher.wait=false``).
        """
        total = (self.spec.n_trials + self.spec.repeats) * len(self.spec.cells())
        start = time.perf_counter()
        if not attach:
            self.spawn(0, n_workers)
        respawns = n_workers
        bar = tqdm(total=total, desc=f"sweep {self.spec.name}", unit="trial", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0, disable=quiet)
        announced: set[str] = set()
        last_check = time.monotonic()
        shown, live = None, sys.stderr.isatty()  # in a log file: a line only when the counts change
        try:
            while True:
                alive = self.launcher.alive()
                c = self.totals()
                finished = c.get("complete", 0) + c.get("pruned", 0) + c.get("diverged", 0) + c.get("fail", 0)
                finished += c.get("skipped", 0)  # LR slots the bracketing search did not need (sweep/search.py)
                bar.n = min(finished, total)
                bar.set_postfix_str(f"running {c.get('running', 0)}, pruned {c.get('pruned', 0)}, "
                                    f"diverged {c.get('diverged', 0)}, failed {c.get('fail', 0)}"
                                    f"{', retried ' + str(c['lost']) if c.get('lost') else ''}", refresh=False)
                if live or c != shown:
                    bar.refresh()
                    shown = c
                self.announce_cells(bar, announced)
                if time.monotonic() - last_check > 5 or not alive:
                    last_check = time.monotonic()
                    left = self.recover() or self.totals().get("waiting", 0)
                    if left and not alive and respawns < 2 * n_workers:
                        self.spawn(respawns, 1)  # a retried trial and nobody left to run it
                        respawns += 1
                        continue
                if not alive:
                    break
                self.launcher.pause(1.0)  # local: wakes at once when a worker ends
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see ``stop_on_sigterm``)
            bar.close()
            self.stop_workers()
            raise
        bar.close()
        if self.launcher.failed():
            log.warning("%d worker(s) stopped with an error; see %s", self.launcher.failed(), self.log_dir)
        return time.perf_counter() - start

    def stop_workers(self) -> None:
        """Stopped: the workers give their trials back and end their runs KILLED; so do the cell and summary runs.

        Nothing is left RUNNING and nothing is lost: the same command resumes where this one stopped.
        """
        with stop_ignored():  # a second Ctrl-C must not cut the giving back short
            self.launcher.stop()
            join = getattr(self.launcher, "join", None)
            if join is not None:
                join(STOP_WAIT_S)
            try:
                self.recover()  # trials of workers that died before giving them back
                for study in self.studies:
                    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                    mark_killed(self.client, self.experiment_id, study.study_name, failed)
                    self.client.set_terminated(study.user_attrs["mlflow_parent_run_id"], "KILLED")
                self.client.set_terminated(summary_run(self.client, self.experiment_id, self.spec.name), "KILLED")
            except Exception as e:  # MLflow away: the next run ends them (finish, mark_killed)
                log.warning("could not end the sweep's MLflow runs: %s", e)
        print("sweep stopped; its workers gave their trials back. Run the same command again to resume.",
              file=sys.stderr)

    def snapshot(self, who: str) -> list[dict]:
        """``action=status`` while a driver runs: the table read from the storage; nothing written."""
        studies = sorted(sweep_studies(self.storage, self.spec.name), key=lambda s: s.user_attrs.get("order", 0))
        rows = [table.cell_row(study, self.spec.target_acc) for study in studies]
        print("\n" + table.to_markdown(rows, self.spec.target_acc))
        print(f"sweep {self.spec.name} is being run by {who}: this is a snapshot.", file=sys.stderr)
        return rows

    def announce_cells(self, bar: tqdm, announced: set[str]) -> None:
        for study in self.studies:
            cell = study.user_attrs["cell"]
            c = counts(study)
            if cell in announced or c.get("waiting") or c.get("running"):
                continue
            announced.add(cell)
            row = table.cell_row(study, self.spec.target_acc)
            try:
                self.log_cell(study, row)  # on the dashboard as soon as the cell is done
            except (OSError, MlflowException) as e:  # MLflow away: finish() logs the row again
                log.warning("cell %s: could not log its row to MLflow now (%s); the sweep's end will", cell,
                            type(e).__name__)
            best = (f"best val_acc {row['best_val_acc']:.4f} at lr {row['best_lr']:.3g}"
                    if not math.isnan(row["best_val_acc"]) else "no completed trial")
            bar.write(f"  done: {cell:<40} {best}")

    # ------------------------------------------------------------------ results

    def finish(self) -> list[dict]:
        """Summaries on each cell's parent run, the table as CSV/Markdown artifacts and files."""
        try:
            return self._finish()
        except (OSError, MlflowException) as e:  # requests' errors are OSErrors
            raise TrackingError(
                f"tracking.uri={self.uri}: MLflow does not answer ({type(e).__name__}); every trial's result "
                f"is safe in {self.storage_url}: run the same command again once MLflow is back") from None

    def _finish(self) -> list[dict]:
        self.complete_runs()
        rows = []
        for study in sorted(self.studies, key=lambda s: s.user_attrs.get("order", 0)):
            row = table.cell_row(study, self.spec.target_acc)
            rows.append(row)
            parent = study.user_attrs["mlflow_parent_run_id"]
            self.log_cell(study, row)
            self.client.set_terminated(parent, "FINISHED" if row["running"] == 0 else "KILLED")
            failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if failed and row["running"] == 0:  # a worker killed mid-trial may not have ended its run
                mark_killed(self.client, self.experiment_id, study.study_name, failed)
        md, csv = table.to_markdown(rows, self.spec.target_acc), table.to_csv(rows)
        out = Path("reports") / self.spec.name
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(md)
        (out / "summary.csv").write_text(csv)
        run_id = summary_run(self.client, self.experiment_id, self.spec.name)
        self.client.log_text(run_id, md, "summary.md")
        self.client.log_text(run_id, csv, "summary.csv")
        self.client.set_terminated(run_id, "FINISHED")
        return rows

    def log_cell(self, study: optuna.Study, row: dict) -> None:
        """A cell's table row as metrics of its parent run: sortable columns of the runs table."""
        # NaN is logged too: "no trial got there" (e.g. no LR basin) is an answer, not a gap.
        metrics = {k: v for k, v in row.items() if k != "cell" and isinstance(v, (int, float))}
        RunTracker.for_run(self.client, study.user_attrs["mlflow_parent_run_id"]).log(metrics)

    def monitored(self) -> Any:
        """This machine's CPU/memory/GPU use while local workers run, on the sweep's summary run.

        Cluster workers run elsewhere: this machine's load would say nothing about them.
        """
        if not isinstance(self.launcher, LocalLauncher):
            return contextlib.nullcontext()
        run_id = summary_run(self.client, self.experiment_id, self.spec.name)
        self.client.update_run(run_id, status="RUNNING")  # finish() ends it
        return system_metrics(self.uri, run_id)

    def timing(self) -> dict[str, float]:
        """Summed fit and test-evaluation time, trials run, and summed claim-to-finish time."""
        fit, evaluation, n, spans = 0.0, 0.0, 0, {}
        for study in self.studies:
            for t in study.get_trials(deepcopy=False):
                m, run = t.user_attrs.get("metrics"), t.user_attrs.get("run")
                if m and run and "runtime_s" in m:
                    fit, n = fit + m["runtime_s"], n + 1
                    evaluation += m.get("eval_time_s", 0.0)
                    w = t.user_attrs["worker"]
                    first, last = spans.get(w["pid"], (math.inf, 0.0))
                    spans[w["pid"]] = (min(first, w["claimed_at"]), max(last, run["finished_at"]))
        # busy: each worker's first claim to last finish, i.e. everything but process start-up
        return {"fit_s": fit, "eval_s": evaluation, "trials": n, "busy_s": sum(b - a for a, b in spans.values())}


def open_sweep(cfg: DictConfig) -> Sweep:
    raw = OmegaConf.to_container(cfg.sweep, resolve=True)
    if cfg.get("population") is not None:  # how to run, not what: a command-line choice
        raw["population"] = cfg.population
    spec = parse(raw, list(cfg.overrides or []))
    workers = cfg.workers or worker_count()
    if workers < 1:
        raise ConfigError(f"workers={workers} is not allowed; it must be >= 1")
    launcher = instantiate(cfg.launcher) if cfg.get("launcher") else LocalLauncher(workers)
    store = Path(cfg.tracking.store_dir).resolve()
    url = cfg.storage or default_storage(store, spec.name)
    if not isinstance(launcher, LocalLauncher) and "://" not in url:
        log.warning("launcher=%s with a journal file (%s): every node must see it on a shared filesystem "
                    "(else set storage=postgresql://...)", cfg.launcher.get("_target_", "?").split(".")[-1], url)
    return Sweep(spec, url, connect(cfg.tracking), store, float(cfg.stale_after_s),
                 getattr(launcher, "workers", workers), launcher, int(cfg.heartbeat_s))


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (kill, a job's end) stops the driver as Ctrl-C does: workers stopped, runs ended."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stop_ignored() -> Iterator[None]:
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(cfg: DictConfig) -> list[dict]:
    quick_requests()
    sweep = open_sweep(cfg)
    lock = lock_path(sweep.store_dir, sweep.spec.name)
    if cfg.action != "run" and (who := owner(lock)):
        return sweep.snapshot(who)
    try:
        with holding(lock, sweep.spec.name), stop_on_sigterm():
            return drive(cfg, sweep)
    except KeyboardInterrupt:  # stop_workers has said what happened and how to resume
        sys.exit(130)


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
