"""How a worker's trial ends in the storage: COMPLETE, PRUNED or FAIL; dropped if it was retried elsewhere."""

from __future__ import annotations

import contextlib
import errno
import logging
import time
import traceback
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import TrialState

from bnsweep.training.run import RunResult

log = logging.getLogger("bnsweep.worker")


class Outcomes:
    """Part of ``worker.Worker``: telling Optuna how its trials ended."""

    def fail(self, study: optuna.Study, trial: optuna.Trial, e: Exception) -> None:
        """One trial's crash is recorded; the sweep goes on."""
        log.error("trial %s of %s failed:\n%s", trial.number, study.study_name, traceback.format_exc())
        with ended_elsewhere(trial):
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            study.tell(trial, state=TrialState.FAIL)

    def record(self, study: optuna.Study, trial: optuna.Trial, result: RunResult) -> None:
        """Tell Optuna how the trial ended; its MLflow requests finish in the background."""
        if result.tracker is not None:
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
            if tracker.outbox:  # a run still owed to the server (MLflow away) is replayed as KILLED too
                tracker.outbox.end("KILLED")
            tracker.close()
            with contextlib.suppress(Exception):
                tracker.client.set_terminated(tracker.run_id, "KILLED")


def disk_full(e: BaseException) -> bool:
    """A write refused for space (ENOSPC, a quota, a file-size limit): the machine's fault, not the trial's."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
