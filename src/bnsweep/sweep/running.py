"""A worker training its claimed trials: one alone (Lightning), several of one cell as a population."""

from __future__ import annotations

import contextlib
import logging

import optuna
from omegaconf import DictConfig, OmegaConf

from bnsweep.errors import TrackingError
from bnsweep.population.loop import run_population
from bnsweep.sweep.heartbeat import Heartbeat, beating
from bnsweep.sweep.outcomes import disk_full
from bnsweep.tracking.runs import answers
from bnsweep.tracking.server import check_reachable
from bnsweep.training.pruning import CheckPruning
from bnsweep.training.run import OFFLINE, run_training

log = logging.getLogger("bnsweep.worker")


class Running:
    """Part of ``worker.Worker``: training claimed trials, with heartbeats, pruning and MLflow runs."""

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
                    callbacks=[*pruning, Heartbeat(self.storage, trial)], track=self.tracking(trial))
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
                    on_done=lambda i, result: self.record(study, trials[i], result),
                    track=self.tracking(trials[0]))  # MLflow away: to the outbox, as a single trial
        except Exception as e:
            for t in trials:
                if not self.storage.get_trial(t._trial_id).state.is_finished():
                    self.fail(study, t, e)
        # the previous trials' requests overlapped this population's training: wait for those only
        self.flush(keep=len(self.trackers) - before)

    def tracking(self, trial: optuna.Trial) -> bool | str:
        """MLflow away at a trial's start: train it with its run in the outbox alone rather than fail it (the
        driver sends it, whole history included, once MLflow is back: ``Sweep.complete_runs``).

        Away includes a server whose own store is away (its database restarting: HTTP 503 while /health
        says 200): the API call of ``check_reachable`` (once per process, then cached) asks the store too.
        """
        try:
            check_reachable(self.tracking_uri)
            if answers(self.tracking_uri):
                return True
            why = "does not answer"
        except TrackingError as e:
            why = f"does not serve this worker now ({str(e).split('(')[-1].split(')')[0]})"
        log.warning("MLflow at %s %s: trial %d keeps its run on local disk; the next `bnsweep sweep` sends it",
                    self.tracking_uri, why, trial.number)
        return OFFLINE

    def flush(self, keep: int = 0) -> None:
        while len(self.trackers) > keep:
            self.trackers.pop(0).close()
