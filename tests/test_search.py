"""The bracketing LR search (sweep/search.py): both edges of the basin, found and refined on one LR lattice.

The synthetic tests drive a real journal-backed Optuna study through the workers' own ``claim`` with a fake
objective whose edges are known (no training); the last test runs a real small sweep end to end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from helpers import sweep_cli

from bnsweep.errors import ConfigError
from bnsweep.stats import fit_digits
from bnsweep.sweep import table
from bnsweep.sweep.basin import LR_KEY, Bracket, search_limits, study_basin
from bnsweep.sweep.definition import parse
from bnsweep.sweep.search import SEED_INDEX, SKIPPED, BasinSearch
from bnsweep.sweep.slots import basin_search, claim, give_back, is_repeat, search_done, top_up
from bnsweep.sweep.storage import default_storage, open_storage, sweep_studies

TARGET = 0.9
RAW = {"name": "s", "base": ["data.limit_train=100"], "grid": {"model.bn.placement": ["none"]},
       "basin": {"low": 1e-5, "high": 1e3, "start": [1e-3, 10.0], "resolution": 0.25}, "n_trials": 40,
       "repeats": 0, "target_acc": TARGET}

Objective = Callable[[float, int], str]  # (lr, basin seed) -> "reached" | "missed" | "diverged"


def basin_between(lo: float, hi: float, diverge_above: float = math.inf) -> Objective:
    """Reaches the target for lo <= lr <= hi; misses outside; diverges above ``diverge_above``."""
    return lambda lr, seed: "diverged" if lr > diverge_above else "reached" if lo <= lr <= hi else "missed"


def make_study(path: Path, **changes) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    spec = parse({**RAW, **changes})
    storage = open_storage(str(path))
    study = optuna.create_study(storage=storage, study_name="s/c", direction="maximize", load_if_exists=True)
    for k, v in spec.to_attrs().items():
        study.set_user_attr(k, v)
    top_up(study, spec)
    return study, storage


def finish(study: optuna.Study, trial: optuna.Trial, outcome: str) -> None:
    """End a claimed trial as the worker would: complete with its accuracy, or pruned as diverged."""
    acc = {"reached": 0.97, "missed": 0.5, "diverged": 0.1}[outcome]
    trial.set_user_attr("metrics", {"best_val_acc": acc, "epochs_to_converge": 1, "s_per_epoch": 0.1})
    if outcome == "diverged":
        trial.set_user_attr("diverged", True)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, acc)


def drive(study: optuna.Study, storage, objective: Objective, k: int = 1, stop_after: int | None = None) -> list:
    """Claim up to ``k`` trials at a time (a population) and finish them; the (seed, lr) batches in order."""
    batches, n = [], 0
    while stop_after is None or n < stop_after:
        claimed = []
        while len(claimed) < k and (t := claim(storage, study)) is not None:
            claimed.append(t)
        if not claimed:
            break
        batch = [(int(t.user_attrs.get(SEED_INDEX, 0)), t.params[LR_KEY]) for t in claimed]
        for t, (seed, lr) in zip(claimed, batch, strict=True):
            finish(study, t, objective(lr, seed))
        batches.append(batch)
        n += len(claimed)
    return batches


def main_bracket(study: optuna.Study, target: float = TARGET) -> Bracket | None:
    """The first basin seed's bracket, as the table, summary.csv and the report read it (``study_basin``)."""
    return study_basin(study, None, target).main


def lattice(lr: float, resolution: float = 0.25) -> bool:
    return abs(math.log10(lr) / resolution - round(math.log10(lr) / resolution)) < 1e-9


def test_both_edges_closed_to_the_resolution_with_a_diverging_side(tmp_path: Path) -> None:
    study, storage = make_study(tmp_path / "j.journal")
    lo, hi = 10**-2.1, 10**0.6
    batches = drive(study, storage, basin_between(lo, hi, diverge_above=10**0.9))
    lrs = [lr for b in batches for _, lr in b]
    assert len(lrs) == len(set(lrs)) and all(lattice(lr) for lr in lrs)  # each lattice point once
    br = main_bracket(study)
    assert br is not None and br.closed and br.edge_resolution() <= 0.25 + 1e-9
    assert br.lower_lo < lo <= br.lower_hi and br.upper_lo <= hi < br.upper_hi
    trials = study.get_trials()
    assert any(t.user_attrs.get("diverged") for t in trials)  # the upper side was found by divergence
    assert search_done(trials, 40) and sum(bool(t.user_attrs.get(SKIPPED)) for t in trials) == 40 - len(lrs)
    row = table.cell_row(study, TARGET)
    assert row["skipped"] == 40 - len(lrs) and row["basin_lower_open"] == 0.0 and row["basin_upper_open"] == 0.0
    assert row["basin_width_lo"] <= math.log10(hi / lo) <= row["basin_width_hi"]


def test_an_edge_at_the_hard_limit_is_reported_open(tmp_path: Path) -> None:
    study, storage = make_study(tmp_path / "j.journal", basin={**RAW["basin"], "high": 100.0})
    drive(study, storage, basin_between(10**-1.6, math.inf))
    br = main_bracket(study)
    assert br is not None and br.upper_open and not br.lower_open and br.upper_lo == pytest.approx(100.0)
    assert math.isinf(br.width_hi) and br.lower_lo < 10**-1.6 <= br.lower_hi
    row = table.cell_row(study, TARGET)
    assert row["basin_upper_open"] == 1.0 and math.isnan(row["basin_width_hi"])
    headers, (cells,) = table.formatted([row])
    width = f"{br.width_lo:.2f}".rstrip("0").rstrip(".")
    assert cells[headers.index("LR basin (dec.)")] == f"≥ {width}, upper edge open"


def test_a_population_splits_edge_intervals_and_reaches_the_same_bracket(tmp_path: Path) -> None:
    objective = basin_between(10**-2.1, 10**0.6, diverge_above=10**0.9)
    alone, s1 = make_study(tmp_path / "a.journal")
    drive(alone, s1, objective)
    pop, s2 = make_study(tmp_path / "p.journal", population=3)
    batches = drive(pop, s2, objective, k=3)
    lrs = [lr for b in batches for _, lr in b]
    assert len(lrs) == len(set(lrs)) and max(len(b) for b in batches) == 3
    assert len(batches) < len(drive(*make_study(tmp_path / "b.journal"), objective))  # fewer rounds than alone
    assert main_bracket(pop) == main_bracket(alone)


def test_several_seeds_each_get_their_own_bracket_on_the_same_lattice(tmp_path: Path) -> None:
    study, storage = make_study(tmp_path / "j.journal", basin={**RAW["basin"], "seeds": 2}, population=2)
    shift = {0: 0.0, 1: 0.3}  # seed 1's basin sits 0.3 decades higher
    drive(study, storage, lambda lr, s: basin_between(10 ** (-2.1 + shift[s]), 10 ** (0.6 + shift[s]))(lr, s), k=2)
    search = basin_search(study)
    assert search is not None
    b0, b1 = search.brackets(study.get_trials(), TARGET)
    assert b0 and b1 and b0.closed and b1.closed and b0.edge_resolution() <= 0.25 + 1e-9
    assert b1.lower_lo < 10**-1.8 <= b1.lower_hi and b0.lower_lo < 10**-2.1 <= b0.lower_hi
    seeds = {t.user_attrs.get(SEED_INDEX) for t in study.get_trials() if not t.user_attrs.get(SKIPPED)}
    assert seeds == {0, 1}
    # one basin everywhere: the table's (and the report's) is the search's, every seed, not the first one's
    basin = study_basin(study, None, TARGET)
    assert basin.brackets == {0: b0, 1: b1} and basin.over_seeds
    row = table.cell_row(study, TARGET)
    assert (row["basin_seeds"], row["basin_seeds_closed"]) == (2, 2)
    assert row["basin_width"] == pytest.approx((b0.width + b1.width) / 2)
    assert (row["basin_width_lo"], row["basin_width_hi"]) == (basin.width.low, basin.width.high)
    assert row["basin_lower_hi"] == b0.lower_hi  # the first seed's edges, in summary.csv
    headers, (cells,) = table.formatted([row])
    assert cells[headers.index("LR basin (dec.)")] == fit_digits(basin.width, signed=False)
    assert study.user_attrs["basin"].items() >= {"low": 1e-5, "high": 1e3, "resolution": 0.25, "seeds": 2}.items()


def test_resume_mid_refinement_continues_to_the_same_bracket_without_repeating_points(tmp_path: Path) -> None:
    objective = basin_between(10**-2.1, 10**0.6, diverge_above=10**0.9)
    ref, s_ref = make_study(tmp_path / "ref.journal")
    whole = [lr for b in drive(ref, s_ref, objective) for _, lr in b]

    path = tmp_path / "j.journal"
    study, storage = make_study(path)
    first = [lr for b in drive(study, storage, objective, stop_after=7) for _, lr in b]
    dying = claim(storage, study)  # a worker dies mid-refinement: its trial is handed back for a retry
    assert dying is not None
    give_back(storage, study, dying)
    # a new process: the storage reopened from the journal file, the driver tops up the lost slot
    study, storage = make_study(path)
    rest = [lr for b in drive(study, storage, objective) for _, lr in b]
    assert first + rest == whole and len(set(whole)) == len(whole)
    assert main_bracket(study) == main_bracket(ref)


def test_a_trial_cap_leaves_edges_unrefined_and_says_so(tmp_path: Path) -> None:
    study, storage = make_study(tmp_path / "j.journal", n_trials=5)
    drive(study, storage, basin_between(10**-2.1, 10**0.6, diverge_above=10**0.9))
    assert search_done(study.get_trials(), 5)
    br = main_bracket(study)
    assert br is not None and br.edge_resolution() > 0.25  # the start grid only: 1-decade brackets


def test_one_rule_for_the_search_limits() -> None:
    """The table and the report bracket within the same limits: the basin search's, else the searched LR range."""
    lr = optuna.distributions.distribution_to_json(optuna.distributions.FloatDistribution(1e-3, 1.0, log=True))
    assert search_limits({"basin": {"low": 1e-5, "high": 1e3}, "search": {LR_KEY: lr}}, (1e-2, 1.0)) == (1e-5, 1e3)
    assert search_limits({"search": {LR_KEY: lr}}, (1e-2, 0.5)) == (1e-3, 1.0)
    assert search_limits({}, (1e-2, 0.5)) == (1e-2, 0.5)  # a study that says nothing: the caller's range
    assert search_limits({}) == (0.0, math.inf)


def test_lattice_is_shared_and_config_errors_name_the_key() -> None:
    a, b = BasinSearch(resolution=0.25), BasinSearch(low=1e-3, high=10.0, resolution=0.25)
    assert a.lr(-8) == b.lr(-8) == 10**-2.0 and b.k_low == -12 and b.k_high == 4
    assert parse(RAW).pruner == {"name": "median"} and isinstance(parse(RAW).make_pruner(), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match=r"sweep.basin.resolution=0 is not allowed"):
        parse({**RAW, "basin": {"resolution": 0}})
    with pytest.raises(ConfigError, match=r"sweep.basin has unknown key\(s\) \['step'\]"):
        parse({**RAW, "basin": {"step": 1}})
    with pytest.raises(ConfigError, match=r"sweep.basin is not allowed with sweep.search over model.width"):
        parse({**RAW, "search": {"model.width": {"low": 1, "high": 4}}})


BASIN_SWEEP = """\
name: {name}
description: 2 cells, the bracketing LR search on an MNIST subset, 1 epoch
base: [data=mnist, model=mlp, optimizer=sgd, data.limit_train=2000, data.val_size=1000, "model.hidden=[64]"]
grid:
  model.bn.placement: [none, before_act]
basin: {{low: 1.0e-3, high: 1.0e+3, start: [1.0e-2, 10.0], resolution: 0.25}}
n_trials: 16
epochs: 1
target_acc: 0.8
repeats: 2
population: 4
"""


def test_a_real_sweep_closes_both_edges_of_every_cell(mlflow_server: str, tmp_path: Path) -> None:
    sweep_file = tmp_path / "basin.yaml"
    sweep_file.write_text(BASIN_SWEEP.format(name="t_basin"))
    out = sweep_cli(f"sweep={sweep_file}", "workers=2", f"tracking.uri={mlflow_server}",
                    f"tracking.store_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    studies = sweep_studies(open_storage(default_storage(tmp_path, "t_basin")), "t_basin")
    assert len(studies) == 2
    for s in studies:
        trials = s.get_trials()
        br = main_bracket(s, 0.8)
        assert br is not None and br.closed and br.edge_resolution() <= 0.25 + 1e-9, (s.study_name, br)
        assert table.cell_row(s, 0.8)["basin_width"] == study_basin(s, None, 0.8).width.estimate == br.width
        search = [t for t in trials if not is_repeat(t) and not t.user_attrs.get(SKIPPED)]
        assert all(t.user_attrs["seed"] == 0 and lattice(t.params[LR_KEY]) for t in search)
        repeats = [t for t in trials if is_repeat(t)]
        assert len(repeats) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in repeats)


def test_no_basin_ends_with_no_bracket_after_the_start_range_is_refined(tmp_path: Path) -> None:
    study, storage = make_study(tmp_path / "j.journal")
    lrs = [lr for b in drive(study, storage, lambda lr, s: "missed") for _, lr in b]
    assert sorted(lrs) == [BasinSearch().lr(k) for k in range(-12, 5)]  # every 0.25 decade of 1e-3..10, once
    assert main_bracket(study) is None and math.isnan(table.cell_row(study, TARGET)["basin_width"])
