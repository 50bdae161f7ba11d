"""A sweep worker: ``bnsweep worker --storage URL --sweep NAME --tracking-uri URI``.

An independent process attached to the Optuna storage: it loads each dataset once, then claims
WAITING trials (fewest-finished cell first) and runs them in-process, one after another, until
none is left. The same command runs on this machine or as a cluster job; everything about the
sweep is read from the storage.

A DDP worker is K such processes (RANK/WORLD_SIZE set by ``launch_local.rank_env``): rank 0 claims and
reports; the others receive each trial's config from it and train their shard of every batch.
With ``--recover`` (cluster jobs) a worker with nothing to claim stays while trials run elsewhere
and takes over one whose worker died, so the sweep completes without its submitting command.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import optuna
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from bnsweep.config import compose, instantiate
from bnsweep.defaults import HEARTBEAT_S, STALE_AFTER_S
from bnsweep.errors import ConfigError
from bnsweep.population import auto
from bnsweep.population.checks import AUTO, population_value
from bnsweep.population.loop import run_population
from bnsweep.sweep.definition import SweepSpec
from bnsweep.sweep.heartbeat import Heartbeat, beating
from bnsweep.sweep.search import SEED_INDEX, SEED_STRIDE
from bnsweep.sweep.slots import best_trial, claim, counts, give_back, recover_lost, repeats_blocked, trial_tags
from bnsweep.sweep.storage import heartbeat_enabled, open_storage, sweep_studies
from bnsweep.tracking.runs import answers, get_or_create_experiment, mark_killed, quick_requests, trial_run_name
from bnsweep.training.data import InMemoryDataModule
from bnsweep.training.pruning import CheckPruning
from bnsweep.training.run import RunResult, quiet_lightning, run_training

log = logging.getLogger("bnsweep.worker")


class Worker:
    def __init__(self, storage_url: str, sweep: str, tracking_uri: str, threads: int = 1,
                 seed_offset: int = 0, population: int | str | None = None, heartbeat_s: int = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, recover: bool = False) -> None:
        self.storage = open_storage(storage_url, heartbeat_s, stale_after_s)
        self.population = population  # None: each sweep's own (study attribute "population"); "auto": measured
        self.auto_k: dict[str, int] = {}  # population=auto: the probed K per cell
        self.sweep, self.tracking_uri, self.threads = sweep, tracking_uri, threads
        self.seed_offset, self.stale_after_s, self.recover = seed_offset, stale_after_s, recover
        self.heartbeat_s = heartbeat_s
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if self.world > 1 and not dist.is_initialized():  # one process group for the worker's life
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.control = dist.new_group(backend="gloo") if self.world > 1 else None
        # One study object per cell, with this worker's own sampler and pruner: a sampler keeps
        # its random state across trials (a fresh seeded sampler per trial would repeat its draws).
        self.studies = {s.study_name: self._with_sampler(s) for s in sweep_studies(self.storage, sweep)}
        self.configs: dict[str, DictConfig] = {}
        self.data: dict[str, InMemoryDataModule] = {}
        self.trackers: list = []  # MLflow runs still sending in the background
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

    def next_trial(self) -> tuple[optuna.Study, optuna.Trial] | None:
        order = sorted(self.studies, key=lambda n: sum(counts(self.studies[n]).values()) - len(
            self.studies[n].get_trials(deepcopy=False, states=(TrialState.WAITING,))))
        for name in order:
            study = self.studies[name]
            trial = claim(self.storage, study)
            if trial is not None:
                return study, trial
        return None

    def next_trials(self, limit: int | None = None) -> tuple[optuna.Study, list[optuna.Trial]] | None:
        """A trial, and with population training up to K-1 more WAITING trials of the same cell."""
        nxt = self.next_trial()
        if nxt is None:
            return None
        study, trial = nxt
        k = 1 if self.world > 1 else self.population_size(study)  # DDP: one
        trials = [trial]
        while len(trials) < min(k, limit or k) and (more := claim(self.storage, study)) is not None:
            trials.append(more)
        return study, trials

    def population_size(self, study: optuna.Study) -> int:
        """K for this cell: the worker's or the sweep's population; ``auto`` probed once per cell (auto.py)."""
        value = self.population or study.user_attrs.get("population") or 1
        if value != AUTO:
            return int(value)
        if study.study_name not in self.auto_k:
            cfg = self.config(study)
            k, record = auto.choose(cfg, self.datamodule(cfg))
            log.info("population=auto for %s: K=%d (%s)", study.study_name, k,
                     "cached probe" if record.get("cached") else record.get("reason", "probed now"))
            self.auto_k[study.study_name] = k
        return self.auto_k[study.study_name]

    # ------------------------------------------------------------------ one trial's pieces

    def trial_config(self, study: optuna.Study, trial: optuna.Trial) -> DictConfig | None:
        """The trial's train config (its sampled or repeated params); None if it already failed."""
        spec = SweepSpec.from_attrs(study.user_attrs)
        cfg = self.config(study).copy()
        repeat = trial.user_attrs.get("repeat")
        if repeat and not self.set_repeat(study, trial, spec, cfg):
            return None
        if not repeat:  # basin seed i trains with seed + SEED_STRIDE * i (sweep/search.py); 0 by default
            seed = int(cfg.seed) + SEED_STRIDE * int(trial.user_attrs.get(SEED_INDEX, 0))
            OmegaConf.update(cfg, "seed", seed, merge=False)
            trial.set_user_attr("seed", seed)
        for p in spec.params if not repeat else ():
            OmegaConf.update(cfg, p.key, p.suggest(trial), merge=False)
        OmegaConf.update(cfg, "tracking.run_name", trial_run_name(
            {p.key: OmegaConf.select(cfg, p.key) for p in spec.params}, int(cfg.seed), repeat,
            "retry_of" in trial.user_attrs), merge=False)
        return cfg

    def tags(self, study: optuna.Study, trial: optuna.Trial) -> dict[str, str]:
        return trial_tags(self.sweep, study, trial)

    def fail(self, study: optuna.Study, trial: optuna.Trial, e: Exception) -> None:
        """One trial's crash is recorded; the sweep goes on."""
        log.error("trial %s of %s failed:\n%s", trial.number, study.study_name, traceback.format_exc())
        with ended_elsewhere(trial):
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            study.tell(trial, state=TrialState.FAIL)

    def record(self, study: optuna.Study, trial: optuna.Trial, result: RunResult) -> None:
        """Tell Optuna how the trial ended; its MLflow requests finish in the background."""
        if result.tracker is not None:  # None: trained untracked, MLflow was away (tracking_answers)
            self.trackers.append(result.tracker)
        with ended_elsewhere(trial, result.tracker):
            trial.set_user_attr("metrics", {k: v for k, v in result.metrics.items() if v == v})
            trial.set_user_attr("run", {"mlflow_run_id": result.run_id, "outcome": result.outcome,
                                        "finished_at": time.time()})
            if result.outcome == "completed":
                study.tell(trial, result.metrics["best_val_acc"])
            else:  # pruned, or diverged: a bad region the sampler should learn to avoid
                trial.set_user_attr("diverged", result.outcome == "diverged")
                study.tell(trial, state=TrialState.PRUNED)

    # ------------------------------------------------------------------ running

    def run_claimed(self, study: optuna.Study, trials: list[optuna.Trial]) -> None:
        """Run claimed trials of one cell: one alone, several as a population."""
        members = [(t, cfg) for t in trials if (cfg := self.trial_config(study, t)) is not None]
        if len(members) == 1:
            self.run_trial(study, *members[0])
        elif members:
            self.run_members(study, members)

    def run_trial(self, study: optuna.Study, trial: optuna.Trial, cfg: DictConfig) -> None:
        # Repeats get the full budget; a DDP trial is not pruned (the other ranks hold no trial).
        pruning = [] if trial.user_attrs.get("repeat") or self.world > 1 else [
            CheckPruning(trial, monitor="val_acc")]
        self.share(OmegaConf.to_container(cfg, resolve=True))
        try:
            with beating(self.storage, trial, self.heartbeat_s):
                result = run_training(
                    cfg, datamodule=self.datamodule(cfg), tags=self.tags(study, trial),
                    parent_run_id=study.user_attrs.get("mlflow_parent_run_id"), background_logging=True,
                    callbacks=[*pruning, Heartbeat(self.storage, trial)], track=self.tracking_answers(trial))
        except Exception as e:  # one trial's crash is recorded; the sweep goes on
            if disk_full(e):  # not the trial's fault: give it back (run) and stop this worker
                raise
            self.fail(study, trial, e)
            return
        self.flush(keep=1)  # the previous trial's requests overlapped this trial's training
        self.record(study, trial, result)

    def run_members(self, study: optuna.Study, members: list[tuple[optuna.Trial, DictConfig]]) -> None:
        """Several trials of one cell as one population (see population/loop.py); each ends as its own trial."""
        before = len(self.trackers)
        trials, cfgs = [t for t, _ in members], [c for _, c in members]
        for t in trials:  # a member's s/epoch is its share of the population's time: comparable at equal K only
            t.set_user_attr("population", len(trials))
        try:
            with contextlib.ExitStack() as beats:
                for t in trials:
                    beats.enter_context(beating(self.storage, t, self.heartbeat_s))
                run_population(
                    cfgs, datamodule=self.datamodule(cfgs[0]), tags=[self.tags(study, t) for t in trials],
                    parent_run_id=study.user_attrs.get("mlflow_parent_run_id"), background_logging=True,
                    trials=[None if t.user_attrs.get("repeat") else t for t in trials],  # repeats: full budget
                    heartbeats=[Heartbeat(self.storage, t).beat for t in trials],
                    on_done=lambda i, result: self.record(study, trials[i], result))
        except Exception as e:
            for t in trials:
                if not self.storage.get_trial(t._trial_id).state.is_finished():
                    self.fail(study, t, e)
        # the previous trials' requests overlapped this population's training: wait for those only
        self.flush(keep=len(self.trackers) - before)

    def set_repeat(self, study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, cfg: DictConfig) -> bool:
        """A repeat trains at the cell's best LR with seed + k; False (trial failed) if there is none."""
        best = best_trial(study.get_trials(deepcopy=False))
        if best is None:
            trial.set_user_attr("error", "no LR-search trial completed, so there is no best LR to repeat")
            study.tell(trial, state=TrialState.FAIL)
            return False
        seed = int(cfg.seed) + int(trial.user_attrs["repeat"])
        OmegaConf.update(cfg, "seed", seed, merge=False)
        trial.set_user_attr("repeat_of", best.number)
        trial.set_user_attr("seed", seed)
        for p in spec.params:
            value = best.params[p.key]
            self.storage.set_trial_param(trial._trial_id, p.key, p.dist.to_internal_repr(value), p.dist)
            OmegaConf.update(cfg, p.key, value, merge=False)
        return True

    def share(self, obj: object) -> None:
        """DDP: rank 0 sends the next trial's config (None: no trial left) to the other ranks."""
        if self.world > 1:
            dist.broadcast_object_list([obj], src=0, group=self.control)

    def follow(self) -> int:
        """DDP ranks > 0: train each config rank 0 shares, reporting nothing, until it says stop."""
        while True:
            box: list = [None]
            dist.broadcast_object_list(box, src=0, group=self.control)
            if box[0] is None:
                return self.done
            cfg = OmegaConf.create(box[0])
            try:
                run_training(cfg, datamodule=self.datamodule(cfg), track=False)
            except Exception:
                log.error("rank %d: trial failed:\n%s", self.rank, traceback.format_exc())
            self.done += 1

    def must_wait(self) -> bool:
        """Nothing to claim now, but something may come: repeats wait for an LR trial running elsewhere
        (not for a lost one: it is retried), or, on a cluster, a trial elsewhere may need a successor."""
        return any(repeats_blocked(s, self.stale_after_s) for s in self.studies.values()) or self.others_running()

    def others_running(self) -> bool:
        """Cluster workers wait while any trial runs elsewhere: its worker may die and need a successor.

        (PostgreSQL only: there a stale trial is retried by whoever notices; see ``recover_lost``.)
        """
        return (self.recover and heartbeat_enabled(self.storage)
                and any(counts(s).get("running") for s in self.studies.values()))

    def recover_lost(self) -> None:
        """Retry the trials of dead workers and end their MLflow runs.

        Only where the retry is atomic (Optuna's heartbeat, PostgreSQL): with a journal file the
        driver alone enqueues lost slots again, so two workers never enqueue the same slot twice.
        """
        if not heartbeat_enabled(self.storage):
            return
        for study in self.studies.values():
            lost = recover_lost(self.storage, study, self.stale_after_s)
            if lost:
                client = MlflowClient(self.tracking_uri)
                exp = get_or_create_experiment(client, study.user_attrs["mlflow_experiment"], None)
                mark_killed(client, exp, study.study_name, lost)

    def tracking_answers(self, trial: optuna.Trial) -> bool:
        """MLflow away at a trial's start: train it untracked rather than fail it (its result goes to the
        storage; the driver rebuilds its run from there, ``Sweep.complete_runs``)."""
        if answers(self.tracking_uri):
            return True
        log.warning("MLflow at %s does not answer: trial %d trains without an MLflow run; the next "
                    "`bnsweep sweep` rebuilds its run from the Optuna storage", self.tracking_uri, trial.number)
        return False

    def give_back(self, study: optuna.Study, trials: list[optuna.Trial]) -> None:
        """Hand stopped trials back for a retry, if the storage still takes writes (a full disk may not:
        then the driver sees the dead PID and retries them)."""
        for t in trials:
            try:
                give_back(self.storage, study, t)
            except Exception as e:
                log.warning("trial %d not given back (%s); it is retried once this worker is gone", t.number, e)

    def flush(self, keep: int = 0) -> None:
        while len(self.trackers) > keep:
            self.trackers.pop(0).close()

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
                try:
                    self.run_claimed(study, trials)
                except BaseException:  # stopped from outside (SIGTERM, Ctrl-C), disk full: give the slots back
                    self.give_back(study, trials)
                    raise
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


@contextlib.contextmanager
def ended_elsewhere(trial: optuna.Trial, tracker: Any = None) -> Iterator[None]:
    """A trial retried while this worker was paused (its heartbeat went stale) is not ours to end:
    drop this result with one line (its MLflow run ends KILLED, so the slot keeps one FINISHED run)."""
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        log.warning("trial %d was retried elsewhere while this worker was paused; its result here is dropped",
                    trial.number)
        if tracker is not None:
            tracker.close()
            with contextlib.suppress(Exception):
                tracker.client.set_terminated(tracker.run_id, "KILLED")


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
                    stale_after_s=args.stale_after_s, recover=args.recover)
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


def disk_full(e: BaseException) -> bool:
    """A write refused for space (ENOSPC, a quota, a file-size limit): the machine's fault, not the trial's."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def stop_on_signals() -> None:
    """SIGTERM (the driver stopping, scancel) raises KeyboardInterrupt once, as Ctrl-C does, so the
    trial is given back and its run ended KILLED; later signals are ignored, so nothing cuts that short.
    SIGXFSZ is ignored so a file-size limit is an EFBIG error (handled like a full disk), not a crash."""
    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


if __name__ == "__main__":
    main()
