"""Repeats: extra seeds at each cell's best LR, enqueued as slots after the LR search and claimable only after it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from bnsweep.errors import ConfigError
from bnsweep.stats import fit_digits, mean_ci
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


# ---------------------------------------------------------------------- the table's repeat columns


def crafted(accs: list[float], epochs: list[float], reached: list[int]) -> optuna.Study:
    """An LR search of 3 trials (best: 0.1) and finished repeats at 0.1 with these test accs and epochs to target."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    dist = {"optimizer.lr": FloatDistribution(1e-3, 1.0, log=True)}
    for lr, v in ((0.01, 0.90), (0.1, 0.95), (1.0, 0.5)):
        study.add_trial(create_trial(params={"optimizer.lr": lr}, distributions=dist, value=v, user_attrs={
            "slot": 0, "metrics": {"best_val_acc": v, "test_acc": v - 0.01, "epochs_to_converge": 3 if v > 0.9 else 4,
                                   "converged": int(v > 0.9), "s_per_epoch": 0.5}}))
    for k, (acc, ep, ok) in enumerate(zip(accs, epochs, reached, strict=True), 1):
        study.add_trial(create_trial(params={"optimizer.lr": 0.1}, distributions=dist, value=acc, user_attrs={
            "repeat": k, "seed": k, "metrics": {"best_val_acc": acc, "test_acc": acc, "epochs_to_converge": ep,
                                                "converged": ok, "s_per_epoch": 0.5}}))
    return study


def shown(study: optuna.Study, column: str) -> str:
    headers, (cells,) = table.formatted([table.cell_row(study, 0.9)])
    return cells[headers.index(column)]


def test_the_table_gives_test_acc_over_the_repeats_with_digits_that_fit() -> None:
    accs = [0.9712, 0.9701, 0.9725, 0.9690]
    study = crafted(accs, [2, 3, 2, 3], [1, 1, 1, 1])
    row = table.cell_row(study, 0.9)
    ci = mean_ci(accs)
    assert (row["repeats"], row["test_acc_mean"], row["test_acc_lo"], row["test_acc_hi"]) == (
        4, pytest.approx(ci.estimate), pytest.approx(ci.low), pytest.approx(ci.high))
    assert row["test_acc"] == pytest.approx(0.94)  # the LR search's best trial's, in summary.csv
    assert shown(study, "test acc %") == "97.07 [96.83, 97.31]" == fit_digits(ci, scale=100, signed=False)
    assert (row["repeats_reached"], row["epochs_mean"]) == (4, 2.5) and shown(study, "epochs") == "2.50"
    assert row["done"] == 7 and shown(study, "done/left") == "7/0"
    assert table.to_csv([row]).splitlines()[0].split(",") == table.COLUMNS

    assert shown(crafted(accs[:2], [2, 5], [1, 0]), "epochs") == "2 (1/2 reached)"  # the other one is censored
    assert shown(crafted(accs[:2], [5, 5], [0, 0]), "epochs") == "never"
    assert shown(crafted([0.97, 0.97], [1, 1], [1, 1]), "epochs") == "1"  # no "1.0 [1.0, 1.0]"
    # no repeat finished yet: the LR search's best trial
    assert shown(crafted([], [], []), "test acc %") == "94.0 (search)" and shown(crafted([], [], []), "epochs") == "3"


def test_no_digits_the_interval_cannot_support() -> None:
    """Identical repeats, a wide interval of 2: never '0.0 [-0.0, +0.0]' or '±0.0', never past 100%."""
    for accs in ([0.97, 0.97, 0.97], [0.85, 0.64], [0.1, 0.12, 0.09]):
        study = crafted(accs, [1] * len(accs), [1] * len(accs))
        headers, rows = table.formatted([table.cell_row(study, 0.9)])
        text = " ".join(rows[0])
        assert len(headers) <= 8 and "-0.0" not in text and "±" not in text and "+0" not in text, text
        lo, hi = shown(study, "test acc %").split("[")[-1].rstrip("]").split(", ") if "[" in text else ("0", "0")
        assert 0 <= float(lo) <= float(hi) <= 100
    assert shown(crafted([0.97, 0.97, 0.97], [2.5] * 3, [1] * 3), "test acc %") == "97.00 (the same on all 3)"
    assert shown(crafted([0.97, 0.97, 0.97], [2.5] * 3, [1] * 3), "epochs") == "2.5"
    assert shown(crafted([0.85, 0.64], [1, 1], [1, 1]), "test acc %") == "74 [0, 100]"  # the CI, cut to [0, 100]
