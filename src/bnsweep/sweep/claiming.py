"""A worker's claiming: which trials it takes next, when it waits, and what it gives back or retries."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from bnsweep.population import auto
from bnsweep.population.checks import AUTO
from bnsweep.sweep.slots import claim, counts, give_back, recover_lost, repeats_blocked
from bnsweep.sweep.storage import heartbeat_enabled
from bnsweep.tracking.runs import get_or_create_experiment, mark_killed

log = logging.getLogger("bnsweep.worker")
# Run in order, in a thread of their own, the moment a stop signal arrives (``worker.stop_on_signals``): the
# held trials are given back first, before the main thread unwinds the trial (ending its MLflow run KILLED
# against a busy server can take seconds SLURM does not grant: KillWait, GraceTime). Then e.g. a requeue.
ON_STOP: list[Callable[[], None]] = []
STOPPING: list[threading.Thread] = []  # that thread, once started


def stopping_now() -> None:
    """The stop signal's handler: start ``ON_STOP`` in its own thread (not a daemon: the exit waits for it)."""
    if ON_STOP and not STOPPING:
        STOPPING.append(threading.Thread(target=lambda: [hook() for hook in ON_STOP], name="stopping"))
        STOPPING[0].start()


class Claiming:
    """Part of ``worker.Worker``: taking trials from the storage and handing them back."""

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

    def give_back_held(self) -> None:
        """``ON_STOP``: give back the trials this worker trains right now, at once."""
        held = getattr(self, "holding", None)
        if held is not None:
            self.give_back(*held)

    def give_back(self, study: optuna.Study, trials: list[optuna.Trial]) -> None:
        """Hand stopped trials back for a retry, if the storage still takes writes (a full disk may not:
        then the driver sees the dead PID and retries them)."""
        if STOPPING and STOPPING[0] is not threading.current_thread():
            STOPPING[0].join()  # the stop signal's thread gives them back (give_back_held)
            return
        for t in trials:
            try:
                give_back(self.storage, study, t)
            except Exception as e:
                log.warning("trial %d not given back (%s); it is retried once this worker is gone", t.number, e)
