"""Repeats: extra seeds at each cell's best LR, enqueued as slots after the LR search and claimable only after it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from bnsweep.errors import ConfigError
from bnsweep.sweep import table
from bnsweep.sweep.definition import parse
from bnsweep.sweep.slots import best_trial, claim, is_repeat, search_done, top_up
from bnsweep.sweep.storage import open_storage

RAW = {"name": "r", "base": ["data.limit_train=100"], "grid": {"model.bn.placement": ["none"]},
       "search": {"optimizer.lr": {"low": 1e-3, "high": 1.0, "log": True}}, "sampler": {"name": "grid"},
       "n_trials": 3, "repeats": 2}


def make_study(tmp_path: Path, **changes) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    spec = parse({**RAW, **changes})
    storage = open_storage(str(tmp_path / "r.journal"))
    study = optuna.create_study(storage=storage, study_name="r/c", direction="maximize")
    study.set_user_attr("n_trials", spec.n_trials)
    top_up(study, spec)
    return study, storage


def finish(study: optuna.Study, storage, value: float) -> optuna.Trial:
    trial = claim(storage, study)
    assert trial is not None
    trial.suggest_float("optimizer.lr", 1e-3, 1.0, log=True)
    trial.set_user_attr("metrics", {"best_val_acc": value, "epochs_to_converge": 1, "s_per_epoch": 0.1})
    study.tell(trial, value)
    return trial


def test_repeats_default_to_eight_and_must_be_a_count() -> None:
    assert parse({k: v for k, v in RAW.items() if k != "repeats"}).repeats == 8
    with pytest.raises(ConfigError, match=r"sweep.repeats=-1 is not allowed; it must be a number in \[0, inf\)"):
        parse({**RAW, "repeats": -1})


def test_repeats_are_extra_slots_claimed_only_after_the_lr_search(tmp_path: Path) -> None:
    study, storage = make_study(tmp_path)
    trials = study.get_trials()
    assert [t.user_attrs["slot"] for t in trials] == [0, 1, 2, 3, 4]
    assert [t.user_attrs.get("repeat") for t in trials] == [None, None, None, 1, 2]
    finish(study, storage, 0.90)
    finish(study, storage, 0.95)
    last = claim(storage, study)  # the last LR trial is now running: the repeats must wait
    assert last is not None and not is_repeat(study.get_trials()[last.number])
    assert claim(storage, study) is None
    assert not search_done(study.get_trials(), 3)
    last.suggest_float("optimizer.lr", 1e-3, 1.0, log=True)
    study.tell(last, 0.93)
    assert search_done(study.get_trials(), 3)
    repeat = claim(storage, study)
    assert repeat is not None and study.get_trials()[repeat.number].user_attrs["repeat"] == 1
    assert top_up(study, parse(RAW)) == 0  # every slot is held: nothing enqueued twice


def test_a_better_repeat_never_becomes_the_best_lr(tmp_path: Path) -> None:
    study, storage = make_study(tmp_path, repeats=1)
    for v in (0.90, 0.95, 0.93):
        finish(study, storage, v)
    repeat = finish(study, storage, 0.99)  # a lucky seed at the best LR
    assert is_repeat(study.get_trials()[repeat.number])
    assert best_trial(study.get_trials()).number == 1
    row = table.cell_row(study, 0.9)
    assert row["best_val_acc"] == 0.95 and row["complete"] == 3 and row["running"] == 0


def test_more_lr_trials_after_the_repeats_are_lr_slots_not_repeats(tmp_path: Path) -> None:
    study, _ = make_study(tmp_path)
    assert top_up(study, parse({**RAW, "n_trials": 5})) == 2  # slots 3, 4 of the LR search; repeats keep theirs
    new = study.get_trials()[-2:]
    assert [t.user_attrs for t in new] == [{"slot": 3}, {"slot": 4}]
    assert top_up(study, parse({**RAW, "n_trials": 5, "repeats": 3})) == 1
    assert study.get_trials()[-1].user_attrs == {"slot": 7, "repeat": 3}
