"""Optuna state of a sweep: one study per cell, trial slots, claiming, and recovery of lost trials.

Exact counts with any number of workers: each cell has ``n_trials`` *slots*. The driver enqueues
one WAITING trial per empty slot; workers only ever claim WAITING trials (an atomic storage
transition), never create them. A trial whose worker died is marked FAIL with a ``lost`` attribute
and its slot is enqueued again with the same parameters, so it is retried, not lost.

Two ways to notice a dead worker, one per storage kind: a journal file (one machine) has no
heartbeat of its own, so workers write a ``heartbeat`` attribute each epoch and a dead PID on this
host is caught at once; PostgreSQL (several machines) uses Optuna's native heartbeat thread and
``RetryHeartbeatStaleTrialCallback``, whose WAITING copy keeps the slot (its original then counts
as lost, never as a finished trial).
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections import Counter
from typing import Any

import optuna
from optuna.storages import BaseStorage, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from bnsweep.defaults import MAX_LOST
from bnsweep.sweep.basin import LR_KEY, is_repeat
from bnsweep.sweep.definition import SweepSpec
from bnsweep.sweep.search import SEED_INDEX, SKIPPED, BasinSearch
from bnsweep.sweep.storage import heartbeat_enabled

HOST = socket.gethostname()


def retried(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of stale trials that Optuna's retry callback has re-enqueued (a copy holds their slot)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def live(t: FrozenTrial, gone: set[int] = frozenset()) -> bool:  # type: ignore[assignment]
    """A trial that holds its slot: anything but a FAIL of a worker that died (``gone``: ``retried``)."""
    return not (t.state == TrialState.FAIL and (t.user_attrs.get("lost") or t.number in gone))


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The cell's best LR-search trial (the first one on ties); repeats never count."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and not is_repeat(t)]
    return max(done, key=lambda t: t.value) if done else None


def search_done(trials: list[FrozenTrial], n_trials: int) -> bool:
    """Every LR-search slot holds a finished trial: the best LR is final and its repeats may run."""
    gone = retried(trials)
    finished = {t.user_attrs.get("slot") for t in trials
                if live(t, gone) and not is_repeat(t) and t.state.is_finished()}
    return all(s in finished for s in range(n_trials))


def _slot(t: FrozenTrial) -> int | tuple[bool, int]:
    """An LR-search slot number, or (True, k) for repeat k (so n_trials can grow after repeats ran)."""
    return (True, t.user_attrs["repeat"]) if is_repeat(t) else t.user_attrs.get("slot")


def top_up(study: optuna.Study, spec: SweepSpec) -> int:
    """Enqueue a WAITING trial for every slot that no live trial holds; return how many.

    Repeats 1..``repeats`` come after (slots ``n_trials ..``); their LR (the cell's best) and seed are
    set when claimed.
    """
    trials = study.get_trials(deepcopy=False)
    gone = retried(trials)
    held = {_slot(t) for t in trials if live(t, gone)}
    retry = {_slot(t): t for t in trials if not live(t, gone) and "slot" in t.user_attrs}
    fixed = spec.fixed_params()
    added = 0
    for slot in [*range(spec.n_trials), *((True, k) for k in range(1, spec.repeats + 1))]:
        if slot in held:
            continue
        if isinstance(slot, tuple):
            attrs: dict[str, Any] = {"slot": spec.n_trials + slot[1] - 1, "repeat": slot[1]}
            params = {}
        else:
            attrs, params = {"slot": slot}, fixed[slot]
        if slot in retry:  # same parameters as the lost attempt: a retry, not a new sample
            params = retry[slot].params or params
            attrs["retry_of"] = retry[slot].number
            if SEED_INDEX in retry[slot].user_attrs:  # the bracketing search's seed goes with its point
                attrs[SEED_INDEX] = retry[slot].user_attrs[SEED_INDEX]
        study.enqueue_trial(params, user_attrs=attrs)
        added += 1
    return added


def basin_search(study: optuna.Study) -> BasinSearch | None:
    """The cell's bracketing LR search (study attribute ``basin``), if it uses one."""
    attrs = study.user_attrs.get("basin")
    return BasinSearch.from_attrs(attrs) if attrs else None


def _fixed_lr(t: FrozenTrial) -> bool:
    """A WAITING trial whose LR is already set (a retry of a lost trial keeps its point)."""
    return LR_KEY in t.params or LR_KEY in (t.system_attrs.get("fixed_params") or {})


def claim(storage: BaseStorage, study: optuna.Study) -> optuna.Trial | None:
    """Take one WAITING trial of ``study`` (atomic: two workers never get the same one).

    Repeats wait until the cell's LR search is done. Under the bracketing search (``basin_search``) an
    LR slot gets its point here, so the next claim sees it as pending: it waits while no point is useful
    until a running one ends, and ends as ``skipped`` (no training, no evidence) once the search is over.
    """
    ready = None
    basin = basin_search(study)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if basin is not None:  # a retry first: its point was chosen before any new one
        waiting.sort(key=lambda t: not _fixed_lr(t))
    for t in waiting:
        point = None
        if is_repeat(t):
            if ready is None:
                ready = search_done(study.get_trials(deepcopy=False), study.user_attrs.get("n_trials", 0))
            if not ready:
                continue
        elif basin is not None and not _fixed_lr(t):
            trials, target = study.get_trials(deepcopy=False), study.user_attrs.get("target_acc", 0.0)
            point = basin.propose(trials, target)
            if point is None:
                if not basin.concluded(trials, target):
                    break  # a running point decides what comes next (and the repeats wait for the search)
                _skip(storage, study, t)
                continue
        try:
            if heartbeat_enabled(storage):  # first: a claimer killed right after the next line leaves a trial
                storage.record_heartbeat(t._trial_id)  # that goes stale (retried), not one RUNNING forever
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                fixed = (t.system_attrs.get("fixed_params") or {}).get(LR_KEY)
                if basin is not None and not is_repeat(t) and (point or fixed):  # visible to the next claim
                    if point is not None:  # (two workers racing here may both get one point: a wasted trial)
                        storage.set_trial_user_attr(t._trial_id, SEED_INDEX, point[0])
                    dist = SweepSpec.from_attrs(study.user_attrs).params[0].dist
                    lr = point[1] if point is not None else fixed
                    storage.set_trial_param(t._trial_id, LR_KEY, dist.to_internal_repr(lr), dist)
                trial = optuna.Trial(study, t._trial_id)
                now = time.time()
                trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid(), "claimed_at": now, "job": slurm_job()})
                trial.set_user_attr("heartbeat", now)
                if heartbeat_enabled(storage):  # its worker's own now
                    storage.record_heartbeat(t._trial_id)  # type: ignore[attr-defined]
                return trial
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _skip(storage: BaseStorage, study: optuna.Study, t: FrozenTrial) -> None:
    """Finish an LR slot the concluded search does not need: it holds its slot, but is no evidence."""
    try:
        if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
            storage.set_trial_user_attr(t._trial_id, SKIPPED, "the basin search needed no more points")
            study.tell(t.number, state=TrialState.PRUNED, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def slurm_job() -> str | None:
    """This process's SLURM job as squeue and scancel name it (``<array>_<task>`` in an array), if any."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_lost(t: FrozenTrial, stale_after_s: float, now: float | None = None) -> bool:
    """A RUNNING trial whose worker is gone: a dead PID on this host, or no heartbeat for a while."""
    if t.state != TrialState.RUNNING:
        return False
    worker = t.user_attrs.get("worker") or {}
    if worker.get("host") == HOST:  # this host: its PID says it all (a paused worker is alive, a dead one is lost)
        return not _pid_alive(int(worker.get("pid", -1)))
    beat = t.user_attrs.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else 0)
    return (now or time.time()) - beat > stale_after_s


def repeats_blocked(study: optuna.Study, stale_after_s: float) -> bool:
    """Repeats (or the bracketing search's next point) wait for an LR-search trial still running elsewhere:
    a worker should wait, not exit."""
    trials = study.get_trials(deepcopy=False)
    return any(t.state == TrialState.WAITING for t in trials) and any(
        not is_repeat(t) and t.state == TrialState.RUNNING and not is_lost(t, stale_after_s) for t in trials)


def recover_lost(storage: BaseStorage, study: optuna.Study, stale_after_s: float) -> list[FrozenTrial]:
    """Mark lost trials FAIL (attr ``lost``) so that ``top_up`` enqueues their slots again.

    With a heartbeat storage (PostgreSQL) Optuna itself fails the stale ones and enqueues their copies.
    """
    if heartbeat_enabled(storage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before]
    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_lost(t, stale_after_s):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "lost", "its worker stopped mid-trial")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            lost.append(t)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished after all
    return lost


def trial_tags(sweep: str, study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> dict[str, str]:
    """The MLflow tags of a trial's run: ``optuna.trial_id`` names it, so a run is found (never made twice)."""
    repeat = trial.user_attrs.get("repeat")
    return {"optuna.study": study.study_name, "optuna.trial": str(trial.number),
            "optuna.trial_id": str(trial._trial_id), "bnsweep.sweep": sweep,
            "bnsweep.cell": study.user_attrs["cell"], "bnsweep.role": "trial",
            **({"bnsweep.repeat": str(repeat)} if repeat else {})}


def give_back(storage: BaseStorage, study: optuna.Study, trial: optuna.Trial) -> None:
    """A worker being stopped (SIGTERM, scancel, Ctrl-C) hands its trial back for a retry at once.

    PostgreSQL: the same atomic FAIL + copy as a stale heartbeat, so no two processes retry it twice;
    a journal: the ``lost`` attribute, and the driver enqueues the slot again (``top_up``).
    """
    if storage.get_trial(trial._trial_id).state.is_finished():
        return  # it ended before the stop (a population's members end one by one)
    storage.set_trial_user_attr(trial._trial_id, "given_back", True)  # stopped, not killed by it: no poison
    retry = storage.get_heartbeat_stale_trial_callback() if heartbeat_enabled(storage) else None  # type: ignore
    if retry is not None:
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # it finished, or someone else retried it already
        return
    storage.set_trial_user_attr(trial._trial_id, "lost", "worker stopped")
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def recover_study(storage: BaseStorage, study: optuna.Study, stale_after_s: float,
                  max_lost: int = MAX_LOST) -> tuple[list[FrozenTrial], int]:
    """Fail the cell's lost trials and enqueue their slots again: (lost trials, trials enqueued)."""
    lost = recover_lost(storage, study, stale_after_s)
    poison_slots(study, max_lost)
    return lost, top_up(study, SweepSpec.from_attrs(study.user_attrs))


def poison_slots(study: optuna.Study, max_lost: int = MAX_LOST) -> list[int]:
    """End a slot whose trial killed its worker ``max_lost`` times (e.g. the OOM killer): no endless retries.

    Trials given back by a stopped worker (SIGTERM, Ctrl-C) do not count: they did not kill it.

    The slot then holds a finished FAIL trial (user attributes ``poison`` and ``error``) with the
    parameters of its last attempt, so the sweep finishes and the table counts it as failed.
    Returns the slots ended so.
    """
    trials = study.get_trials(deepcopy=False)
    gone = retried(trials)
    held = {_slot(t) for t in trials if live(t, gone)}
    attempts: dict[Any, list[FrozenTrial]] = {}
    for t in trials:
        if not live(t, gone) and "slot" in t.user_attrs and not t.user_attrs.get("given_back"):
            attempts.setdefault(_slot(t), []).append(t)
    ended = []
    for slot, lost in attempts.items():
        if slot in held or len(lost) < max_lost:
            continue
        last = max(lost, key=lambda t: t.number)
        attrs = {k: last.user_attrs[k] for k in ("slot", "repeat") if k in last.user_attrs}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.FAIL, params=last.params, distributions=last.distributions, user_attrs={
                **attrs, "poison": len(lost), "retry_of": last.number,
                "error": f"its worker died {len(lost)} times running it (killed: out of memory?); "
                         "not retried again"}))
        ended.append(attrs["slot"])
    return ended


def counts(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> Counter:
    c: Counter = Counter()
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    gone = retried(trials)
    for t in trials:
        key = "lost" if not live(t, gone) else t.state.name.lower()
        if t.user_attrs.get("diverged"):
            key = "diverged"
        elif t.user_attrs.get(SKIPPED):
            key = "skipped"
        c[key] += 1
    return c


