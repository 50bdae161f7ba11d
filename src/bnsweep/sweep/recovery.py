"""The driver's recovery: trials of dead workers retried, finished trials' MLflow runs made whole from the storage."""

from __future__ import annotations

import logging

import optuna
from optuna.trial import TrialState

from bnsweep.sweep.slots import live, recover_study, retried, trial_tags
from bnsweep.tracking import outbox
from bnsweep.tracking.names import RUN_NAME_TAG, trial_run_name
from bnsweep.tracking.runs import complete_trial_runs, mark_killed

log = logging.getLogger("bnsweep.sweep")


def run_name(t: optuna.trial.FrozenTrial) -> str:
    """A trial's MLflow run name, as its worker gave it (``trial_run_name``): a rebuilt run gets the same."""
    return trial_run_name(t.params, t.user_attrs.get("seed"), t.user_attrs.get("repeat"), "retry_of" in t.user_attrs)


class Recovery:
    """Part of ``state.Sweep``: what dead workers and an absent MLflow left behind."""

    def recover(self) -> int:
        """Retry trials whose worker died; mark their MLflow runs KILLED. Returns trials enqueued."""
        added = 0
        for study in self.studies:
            lost, n = recover_study(self.storage, study, self.stale_after_s, self.max_lost)
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
