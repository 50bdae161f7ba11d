"""Optuna's own heartbeat (RDB storages, as PostgreSQL on a cluster): a stale trial is retried in its slot.

SQLite stands in for PostgreSQL here (same RDBStorage code, one process); tests/cluster runs the real thing.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from bnsweep.sweep.definition import parse
from bnsweep.sweep.slots import claim, counts, give_back, recover_lost, recover_study, search_done, top_up


def test_stale_trial_is_retried_in_its_slot_and_counted_once(tmp_path: Path) -> None:
    spec = parse({"name": "t", "base": ["data.limit_train=100"], "grid": {"model.bn.placement": ["none"]},
                  "search": {"optimizer.lr": {"low": 1e-3, "high": 1.0, "log": True}}, "n_trials": 2,
                  "sampler": {"name": "random", "seed": 0}, "repeats": 0})
    storage = RDBStorage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, grace_period=1,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
    study = optuna.create_study(storage=storage, study_name="t/c", direction="maximize")
    for k, v in spec.to_attrs().items():
        study.set_user_attr(k, v)
    assert top_up(study, spec) == 2

    victim = claim(storage, study)  # claimed, heartbeat recorded, then its worker dies
    lr = victim.suggest_float("optimizer.lr", 1e-3, 1.0, log=True)
    time.sleep(2.5)
    lost, added = recover_study(storage, study, 1)
    assert [t.number for t in lost] == [victim.number] and added == 0  # Optuna's copy holds the slot
    assert counts(study) == {"lost": 1, "waiting": 2}

    while (trial := claim(storage, study)) is not None:
        study.tell(trial, 0.5)
    trials = study.get_trials()
    (copy,) = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number]
    assert copy.state == TrialState.COMPLETE and copy.params["optimizer.lr"] == lr
    assert sorted(t.user_attrs["slot"] for t in trials if t.state == TrialState.COMPLETE) == [0, 1]
    assert counts(study) == {"complete": 2, "lost": 1} and search_done(trials, 2)
    assert top_up(study, spec) == 0  # nothing left to enqueue: exactly n_trials finished trials


def test_stopped_worker_gives_its_trial_back_at_once(tmp_path: Path) -> None:
    """SIGTERM / scancel: the same atomic FAIL + copy as a stale heartbeat, without waiting for it."""
    storage = RDBStorage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=60, grace_period=600,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
    study = optuna.create_study(storage=storage, study_name="t/c")
    study.enqueue_trial({"x": 0.5}, user_attrs={"slot": 0})
    trial = claim(storage, study)
    give_back(storage, study, trial)
    give_back(storage, study, trial)  # twice (a second signal): still one copy
    assert counts(study) == {"lost": 1, "waiting": 1}
    (copy,) = study.get_trials(states=(TrialState.WAITING,))
    assert copy.user_attrs["slot"] == 0 and RetryHeartbeatStaleTrialCallback.retried_trial_number(copy) == 0


def test_a_stopped_population_gives_back_only_its_unfinished_members(tmp_path: Path) -> None:
    """Journal storage: members that already ended stay as they are; the rest become lost slots."""
    from bnsweep.sweep.storage import open_storage

    storage = open_storage(str(tmp_path / "o.journal"))
    study = optuna.create_study(storage=storage, study_name="t/c", direction="maximize")
    for slot in range(3):
        study.enqueue_trial({}, user_attrs={"slot": slot})
    members = [claim(storage, study) for _ in range(3)]
    study.tell(members[0], 0.9)  # this member finished before the stop
    for t in members:
        give_back(storage, study, t)
    states = {t.number: (t.state, "lost" in t.user_attrs) for t in study.get_trials()}
    assert states == {0: (TrialState.COMPLETE, False), 1: (TrialState.FAIL, True), 2: (TrialState.FAIL, True)}


class DiesMidClaim(RDBStorage):
    """A claimer killed the moment it took its trial: before it could write anything else about it."""

    def set_trial_user_attr(self, trial_id: int, key: str, value: object) -> None:
        if key == "worker":
            raise KeyboardInterrupt("killed mid-claim")
        super().set_trial_user_attr(trial_id, key, value)


def test_a_claimer_killed_mid_claim_leaves_a_trial_that_goes_stale(tmp_path: Path) -> None:
    """Optuna judges staleness by heartbeat rows only: a trial taken without one stayed RUNNING forever and
    its cluster workers waited for it (found by the 3-node fault test). The claim records one first."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    dying = DiesMidClaim(url, heartbeat_interval=1, grace_period=1,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
    study = optuna.create_study(storage=dying, study_name="t/c", direction="maximize")
    study.enqueue_trial({}, user_attrs={"slot": 0})
    with pytest.raises(KeyboardInterrupt):
        claim(dying, study)
    storage = RDBStorage(url, heartbeat_interval=1, grace_period=1,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
    study = optuna.load_study(study_name="t/c", storage=storage)
    assert counts(study) == {"running": 1}
    time.sleep(2.5)
    assert [t.number for t in recover_lost(storage, study, 1)] == [0]
    assert counts(study) == {"lost": 1, "waiting": 1}  # Optuna's copy holds the slot
