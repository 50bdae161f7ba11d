"""A sweep worker: ``bnsweep worker --storage URL --sweep NAME --tracking-uri URI``.

An independent process attached to the Optuna storage: it loads each dataset once, then claims
WAITING trials (fewest-finished cell first) and runs them in-process, one after another, until
none is left. The same command runs on this machine or as a cluster job; everything about the
sweep is read from the storage.

A DDP worker is K such processes (RANK/WORLD_SIZE set by ``launch_local.rank_env``): rank 0 claims and
reports; the others receive each trial's config from it and train their shard of every batch.
With ``--recover`` (cluster jobs) a worker with nothing to claim stays while trials run elsewhere
and takes over one whose worker died, so the sweep completes without its submitting command.

The worker's concerns: ``claiming`` (what to take, wait for, give back), ``trials`` (a trial's config),
``running`` (training it), ``outcomes`` (telling Optuna how it ended) and ``ddp`` (its ranks).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import optuna
import torch
from omegaconf import DictConfig, OmegaConf

from bnsweep.config import compose, instantiate
from bnsweep.defaults import HEARTBEAT_S, STALE_AFTER_S, STORAGE_WAIT_S
from bnsweep.errors import ConfigError
from bnsweep.population.checks import population_value
from bnsweep.sweep.claiming import ON_STOP, Claiming, stopping_now
from bnsweep.sweep.ddp import Ranks, join_ranks
from bnsweep.sweep.definition import SweepSpec
from bnsweep.sweep.outcomes import Outcomes, disk_full
from bnsweep.sweep.running import Running
from bnsweep.sweep.storage import open_storage, sweep_studies
from bnsweep.sweep.trials import Trials
from bnsweep.tracking.runs import quick_requests
from bnsweep.training.data import InMemoryDataModule
from bnsweep.training.run import quiet_lightning

__all__ = ["Worker", "disk_full", "main"]

log = logging.getLogger("bnsweep.worker")


class Worker(Claiming, Trials, Running, Outcomes, Ranks):
    """One worker process: its storage, studies, configs and datasets; ``run`` claims and trains until done."""

    def __init__(self, storage_url: str, sweep: str, tracking_uri: str, threads: int = 1,
                 seed_offset: int = 0, population: int | str | None = None, heartbeat_s: int = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, recover: bool = False,
                 storage_wait_s: float = STORAGE_WAIT_S) -> None:
        self.storage = open_storage(storage_url, heartbeat_s, stale_after_s, storage_wait_s)
        self.population = population  # None: each sweep's own (study attribute "population"); "auto": measured
        self.auto_k: dict[str, int] = {}  # population=auto: the probed K per cell
        self.sweep, self.tracking_uri, self.threads = sweep, tracking_uri, threads
        self.seed_offset, self.stale_after_s, self.recover = seed_offset, stale_after_s, recover
        self.heartbeat_s = heartbeat_s
        self.rank, self.world, self.control = join_ranks()
        # One study object per cell, with this worker's own sampler and pruner: a sampler keeps
        # its random state across trials (a fresh seeded sampler per trial would repeat its draws).
        self.studies = {s.study_name: self._with_sampler(s) for s in sweep_studies(self.storage, sweep)}
        self.configs: dict[str, DictConfig] = {}
        self.data: dict[str, InMemoryDataModule] = {}
        self.trackers: list = []  # MLflow runs still sending in the background
        self.holding: tuple[optuna.Study, list[optuna.Trial]] | None = None  # what a stop signal gives back
        self.done = 0

    def _with_sampler(self, study: optuna.Study) -> optuna.Study:
        spec = SweepSpec.from_attrs(study.user_attrs)
        return optuna.load_study(study_name=study.study_name, storage=self.storage,
                                 sampler=spec.make_sampler(self.seed_offset), pruner=spec.make_pruner())

    def config(self, study: optuna.Study) -> DictConfig:
        if study.study_name not in self.configs:
            a = study.user_attrs
            self.configs[study.study_name] = compose("train", [
                *a["overrides"], f"threads={self.threads}", f"tracking.uri={self.tracking_uri}",
                f"tracking.experiment={a['mlflow_experiment']}",
                *([f"tracking.store_dir={a['store_dir']}"] if "store_dir" in a else [])])  # the runs' outbox
        return self.configs[study.study_name]

    def datamodule(self, cfg: DictConfig) -> InMemoryDataModule:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        seed = data.pop("seed", 0)  # batch order only: one copy of the data serves every seed
        key = OmegaConf.to_yaml(data)
        if key not in self.data:
            self.data[key] = instantiate(cfg.data)
            self.data[key].setup("fit")
        self.data[key].seed = seed
        return self.data[key]

    def run(self, max_trials: int | None = None) -> int:
        if self.rank > 0:
            return self.follow()
        try:
            while max_trials is None or self.done < max_trials:
                nxt = self.next_trials(None if max_trials is None else max_trials - self.done)
                if nxt is None:
                    if self.must_wait():
                        time.sleep(1.0)  # repeats start when the cell's last LR trial (elsewhere) ends
                        if self.recover:
                            self.recover_lost()
                        continue
                    break
                study, trials = nxt
                self.holding = (study, trials)
                try:
                    self.run_claimed(study, trials)
                except BaseException:  # stopped from outside (SIGTERM, Ctrl-C), disk full: give the slots back
                    self.give_back(study, trials)
                    raise
                finally:
                    self.holding = None
                self.done += len(trials)
        finally:
            self.flush()
            self.share(None)
        return self.done


def population_arg(value: str) -> int | str | None:
    """``--population``: K or auto, with the one-line error of a bad value."""
    try:
        return population_value(value, "--population")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", required=True, help="Optuna storage: journal file path or postgresql://...")
    ap.add_argument("--sweep", required=True, help="sweep name (studies '<sweep>/<cell>')")
    ap.add_argument("--tracking-uri", required=True, help="MLflow tracking server URL")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of this worker")
    ap.add_argument("--seed-offset", type=int, default=0, help="added to the sampler seed (one per worker)")
    ap.add_argument("--population", type=population_arg, default=None,
                    help="trials trained together as one population, or auto: the fastest K measured on this "
                         "machine (default: the sweep's own)")
    ap.add_argument("--max-trials", type=int, default=None, help="stop after this many trials")
    ap.add_argument("--heartbeat-s", type=int, default=HEARTBEAT_S,
                    help=f"PostgreSQL: heartbeat interval of a running trial (default: {HEARTBEAT_S})")
    ap.add_argument("--stale-after-s", type=float, default=STALE_AFTER_S,
                    help=f"a trial silent this long is retried (default: {STALE_AFTER_S:g})")
    ap.add_argument("--storage-wait-s", type=float, default=STORAGE_WAIT_S,
                    help=f"PostgreSQL away (a restart): retry this long before stopping (default: {STORAGE_WAIT_S:g})")
    ap.add_argument("--recover", action="store_true",
                    help="stay while trials run elsewhere and retry those whose worker died (cluster jobs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[worker {os.getpid()}] %(message)s", stream=sys.stderr)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    stop_on_signals()
    quick_requests()
    quiet_lightning()
    torch.set_num_threads(args.threads)
    worker = Worker(args.storage, args.sweep, args.tracking_uri, args.threads, args.seed_offset,
                    population=args.population, heartbeat_s=args.heartbeat_s,
                    stale_after_s=args.stale_after_s, recover=args.recover, storage_wait_s=args.storage_wait_s)
    ON_STOP.insert(0, worker.give_back_held)  # first: then whatever the job adds (launch_slurm: a requeue)
    try:
        n = worker.run(args.max_trials)
    except KeyboardInterrupt:
        log.info("stopped; trials given back")
        sys.exit(130)
    except OSError as e:
        if not disk_full(e):
            raise
        sys.exit(f"error: disk full ({e.strerror}: {e.filename or 'the Optuna journal or a heartbeat'}): "
                 "this worker stopped and gave its trial back; free space, then run the sweep again")
    log.info("no trial left to claim; ran %d", n)


def stop_on_signals() -> None:
    """SIGTERM (the driver stopping, scancel) raises KeyboardInterrupt once, as Ctrl-C does, so the
    trial is given back and its run ended KILLED; later signals are ignored, so nothing cuts that short.
    SIGXFSZ is ignored so a file-size limit is an EFBIG error (handled like a full disk), not a crash."""
    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stopping_now()  # the held trials given back from a thread of their own, at once
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


if __name__ == "__main__":
    main()
