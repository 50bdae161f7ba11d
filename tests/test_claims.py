"""The seeds' claims: the tests behind every verdict against scipy on crafted data, censored and lattice values,
Holm's correction, the as-stated settings held to the seeds' notes, effects that are zero by construction, and
the claims command on a small real sweep."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from helpers import studies_of
from scipy import stats as sps

from bnsweep.config import compose
from bnsweep.report.registry import CLAIM_COLUMNS, CLAIMS, SUMMARY_COLUMNS, SWEEPS, Setting, arm
from bnsweep.report.results import CellResult, TrialResult
from bnsweep.report.seeds import NOTES, mismatches
from bnsweep.report.verdicts import POINTS, Study, claim_rows, measure, normalized_by_construction
from bnsweep.stats import (
    Interval,
    censored_pairs,
    decide,
    equivalence,
    holm,
    non_inferiority,
    sign_flip_sides,
    sign_test_sides,
    superiority,
)
from bnsweep.sweep.basin import Basin
from bnsweep.sweep.definition import cell_labels, parse
from bnsweep.training.norms import canonical, legacy

# ---------------------------------------------------------------------- the tests behind a verdict, against scipy

DIFFS = [0.012, 0.018, 0.007, 0.015, 0.011, 0.020, 0.009, 0.016]


def test_superiority_is_scipys_paired_t_test() -> None:
    a = np.array([0.93, 0.94, 0.92, 0.95, 0.93, 0.94])
    b = a - np.array([0.01, 0.02, -0.005, 0.015, 0.012, 0.008])
    t = superiority(list(a - b), +1)
    assert t.p_for == pytest.approx(sps.ttest_rel(a, b).pvalue) and t.p_against == 1.0
    ci = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert (t.iv.low, t.iv.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert superiority(list(a - b), -1).p_against == pytest.approx(sps.ttest_rel(a, b).pvalue)  # the other side


def test_lattice_values_get_scipys_exact_permutation_test_and_a_step_wide_interval() -> None:
    widths = [1.25, 1.0, 1.5, 1.25, 0.75, 1.25]  # basin differences on the 0.25-decade lattice
    ref = sps.permutation_test((np.array(widths),), np.mean, permutation_type="samples", n_resamples=np.inf,
                               alternative="greater")
    assert sign_flip_sides(widths)[0] == pytest.approx(ref.pvalue)
    t = superiority(widths, +1, lattice=0.25)
    assert t.p_for == pytest.approx(min(1.0, 2 * ref.pvalue)) and t.method.startswith("exact sign-flip")
    assert t.iv.half_width >= 0.25


def test_no_verdict_from_a_zero_width_interval_or_one_seed() -> None:
    three = superiority([1.25, 1.25, 1.25], +1, lattice=0.25)  # the old "+1.25 [+1.25, +1.25], n=3 -> wider"
    assert three.p_for == pytest.approx(0.25)  # the exact test: 2 / 2^3
    assert decide(three, three.p) == "not_resolved" and three.iv.half_width == 0.25
    eight = superiority([1.25] * 8, +1, lattice=0.25)
    assert eight.p_for == pytest.approx(2 / 256) and decide(eight, eight.p) == "supported"
    same = superiority([0.01, 0.01, 0.01], +1)  # no spread, no lattice: still an exact test, never a t of inf
    assert same.method.endswith("(no spread)") and decide(same, same.p) == "not_resolved"
    one = superiority([0.05], +1)
    assert one.iv.n == 1 and decide(one, 0.0) == "not_resolved"


def test_censored_runs_are_ordered_never_averaged() -> None:
    # (epochs to target, reached?): a run that never reached it is only known to be slower than the budget
    a = [(1.0, True), (1.5, True), (0.75, True), (1.25, True), (1.0, True), (2.0, True), (1.0, True), (1.0, False)]
    b = [(2.0, True), (3.0, False), (3.0, False), (2.5, True), (1.75, True), (3.0, False), (1.0, True), (3.0, False)]
    t = censored_pairs(a, b, expect=-1)
    # orderings: sooner, sooner (b censored), sooner, sooner, sooner, sooner, tie, unknown (both censored) -> 6 of 6
    assert t.p_for == pytest.approx(sps.binomtest(6, 6, 0.5).pvalue)
    assert t.iv.n == 4 and t.iv.estimate == pytest.approx(np.mean([1.0 - 2.0, 1.25 - 2.5, 1.0 - 1.75, 0.0]))
    assert "7/8 vs 4/8" in t.note
    assert sign_test_sides([1, 1, -1, 0])[0] == pytest.approx(sps.binomtest(2, 3, 0.5, alternative="greater").pvalue)


def test_non_inferiority_and_equivalence_are_scipys_one_sided_tests() -> None:
    d = [0.001, -0.002, 0.0, 0.0015, -0.001, 0.0005]
    ni = non_inferiority(d, 0.005)
    assert ni.p_for == pytest.approx(sps.ttest_1samp(d, -0.005, alternative="greater").pvalue)
    eq = equivalence(d, 0.005)
    assert eq.p_for == pytest.approx(max(sps.ttest_1samp(d, -0.005, alternative="greater").pvalue,
                                         sps.ttest_1samp(d, 0.005, alternative="less").pvalue))
    worse = non_inferiority([-0.02, -0.03, -0.025, -0.018], 0.005)  # clearly worse by more than the margin
    assert decide(worse, worse.p) == "contradicted"


def test_holm_step_down() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1, monotone
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    t = superiority(DIFFS, +1)
    assert decide(t, holm([t.p] * 200)[0]) == "not_resolved" or t.p * 200 < 0.05  # a large family needs more


# ---------------------------------------------------------------------- as stated means as the seed's note states


@cache
def sweep_cells(name: str) -> dict[tuple, list[str]]:
    spec = parse(compose("run_sweep", [f"sweep={name}"]).sweep)
    return {tuple(sorted(cell_labels(c.values).items())): c.overrides for c in spec.cells()}


def arm_config(a):  # noqa: ANN001, ANN201
    cells = sweep_cells(a.study)
    (overrides,) = [o for labels, o in cells.items() if all(dict(labels).get(k) == v for k, v in a.cell)]
    return compose("train", overrides)


def as_stated_departures(claim, s: Setting) -> list[str]:  # noqa: ANN001
    """The keys where an as-stated setting's arms depart from the seed's note (the first arm carries its BN)."""
    out = []
    for seed in claim.seed.split(", ")[:1]:
        note = NOTES[seed]
        for i, a in enumerate(x for x in (s.first, s.second, s.base_first, s.base_second) if x is not None):
            if a.study == "latency":
                continue
            out += [f"{a.study} {a.label}: {m}" for m in
                    mismatches(arm_config(a), note, with_bn=(i == 0), varies=s.varies)]
    return out


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.id for c in CLAIMS])
def test_every_claim_is_tested_as_stated_in_its_seeds_setting_and_in_at_least_4_others(claim) -> None:  # noqa: ANN001
    stated = [s for s in claim.settings if s.protocol == "as_stated"]
    assert len(stated) == 1, claim.id
    assert as_stated_departures(claim, stated[0]) == []
    across = {s.name for s in claim.settings if s.protocol != "as_stated"}
    assert len(across) >= 4 and all(s.why for s in claim.settings)


def test_an_as_stated_row_unlike_its_seed_is_caught() -> None:
    claim = next(c for c in CLAIMS if c.id == "001-acc")
    wrong = Setting("seed 001?", "as_stated", arm("claims_act", model="leaky_relu", placement="after_act"),
                    arm("claims_act", model="leaky_relu", placement="none"))
    bad = as_stated_departures(claim, wrong)
    assert any("model.hidden" in m for m in bad) and any("optimizer.lr" in m for m in bad)
    assert any("trainer.max_epochs: 1 != the note's 10" in m for m in bad)
    assert any("model.bn.input: False != the note's True" in m for m in bad)


# ---------------------------------------------------------------------- effects that are zero by construction


def test_a_metric_read_at_bns_own_output_is_no_evidence() -> None:
    assert normalized_by_construction("act_in", 1, {"placement": "before_act"})
    assert not normalized_by_construction("act_in", 1, {"placement": "after_act"})
    assert normalized_by_construction("linear_in", 2, {"placement": "after_act"})
    assert normalized_by_construction("linear_in", 1, {"placement": "none", "input": True})
    for placement in ("none", "before_act", "after_act"):  # the Linear's own output is never BN's
        assert not normalized_by_construction("linear_out", 2, {"placement": placement, "input": True})


def cell(study: str, labels: dict[str, str], values: list[float], metric: str = "saturation") -> CellResult:
    (overrides,) = [o for k, o in sweep_cells(study).items() if dict(k) == labels]
    reps = [TrialResult(10 + k, 0.1, "complete", {"test_acc": v}, None, repeat=k, seed=k,
                        diagnostics=[{"step": 0, "layer": "fc1", "point": "act_in", "p15": -1, "p50": 0, "p85": 1,
                                      "sat": v, "grad_norm": 1.0}]) for k, v in enumerate(values, 1)]
    return CellResult(",".join(labels.values()), labels, {}, [], reps, None, Basin({}, 1e-4, 1e3), overrides=overrides)


def test_saturation_with_bn_before_the_activation_is_flagged_not_judged() -> None:
    lots, few = [0.4, 0.5, 0.45, 0.42, 0.48], [0.01, 0.02, 0.015, 0.01, 0.012]
    studies = {"claims_act": Study([cell("claims_act", {"model": "sigmoid", "placement": p}, v)
                                    for p, v in (("none", lots), ("before_act", few), ("after_act", few))])}
    claim = next(c for c in CLAIMS if c.id == "000-saturation")
    rows = claim_rows(studies, [claim])
    before = [r for r in rows if r.setting.first.cell == (("model", "sigmoid"), ("placement", "before_act"))]
    after = [r for r in rows if r.setting.first.cell == (("model", "sigmoid"), ("placement", "after_act"))
             and r.setting.protocol == "tuned_lr"]
    assert before and all(r.construction and r.verdict == "not_resolved" and r.test is None for r in before)
    assert "normalized by construction" in before[0].note
    assert after[0].verdict == "supported" and after[0].test.iv.estimate < 0  # a real, movable measurement
    # every saturation / drift row of the registry reads a point no compared cell normalizes, or says so
    for c in CLAIMS:
        if c.metric in POINTS:
            for s in c.settings:
                arms = [a for a in (s.first, s.second) if a is not None]
                bns = [legacy(canonical(arm_config(a).model.norm, arm_config(a).model.bn)) for a in arms]
                constructed = any(normalized_by_construction(*POINTS[c.metric], bn) for bn in bns)
                row = measure(c, s, {})
                assert (row.construction != "") == constructed or "needs the sweep" in row.note


# ---------------------------------------------------------------------- the command, on a small real sweep


SMALL = ["only=claims_seeds", "workers=2", "sweep.repeats=1", "sweep.epochs=1", "latency_rounds=2",
         'overrides=["data.limit_train=1000","data.val_size=500"]']


def claims_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``bnsweep claims`` as a user runs it, from ``cwd``."""
    return subprocess.run([sys.executable, "-m", "bnsweep", "claims", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})


def test_claims_command_writes_both_csvs_and_resumes(mlflow_server: str, tmp_path: Path) -> None:
    args = [*SMALL, f"tracking.uri={mlflow_server}", f"tracking.store_dir={tmp_path}", f"out_dir={tmp_path / 'r'}"]
    first = claims_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "r" / "claims"
    rows = list(csv.DictReader((out / "claims.csv").open()))
    assert list(rows[0]) == CLAIM_COLUMNS
    assert {r["protocol"] for r in rows} == {"as_stated", "fixed_lr", "tuned_lr"}
    assert {r["verdict"] for r in rows} <= {"supported", "contradicted", "not_resolved"}
    summary = list(csv.DictReader((out / "claims_summary.csv").open()))
    assert list(summary[0]) == SUMMARY_COLUMNS and [s["claim_id"] for s in summary] == [c.id for c in CLAIMS]

    # an as-stated row of claims_seeds: the paired difference of the trials stored in Optuna, seed by seed
    studies = {s.user_attrs["cell"]: s for s in studies_of(tmp_path, "claims_seeds")}
    (acc,) = [r for r in rows if r["claim_id"] == "004-optimizers" and r["protocol"] == "as_stated"]

    def per_seed(experiment: str) -> dict[int, float]:
        return {t.user_attrs["seed"]: t.user_attrs["metrics"]["test_acc"]
                for t in studies[f"experiment={experiment}"].trials if t.state.name == "COMPLETE"}
    a, b = per_seed("seed004_bn"), per_seed("seed004_nobn")
    diffs = [a[s] - b[s] for s in sorted(a) if s in b]
    assert int(acc["n"]) == len(diffs) == 2 and float(acc["diff"]) == pytest.approx(np.mean(diffs))
    ref = sps.ttest_1samp(diffs, -0.005, alternative="greater").pvalue
    assert f"p={ref:.3g}" in acc["note"]  # non-inferiority, margin 0.5 pp: scipy's p

    # rows whose sweep did not run say so; latency rows are measured here and now
    assert all("needs the sweep" in r["note"] for r in rows if r["protocol"] == "tuned_lr")
    lat = [r for r in rows if r["metric"] == "latency"]
    assert lat and all(int(r["n"]) == 2 and float(r["diff"]) > 0 for r in lat)
    md = (out / "claims.md").read_text()
    assert md.splitlines()[2].startswith("What held where") and md.count("(seed 0") >= len(CLAIMS)
    assert (out / "claims.html").read_text().count("<table") >= 2

    n_trials = sum(len(s.trials) for s in studies.values())
    again = claims_cli(*args, cwd=tmp_path)  # resumable: nothing is trained again, the same rows come out
    assert again.returncode == 0, again.stderr[-3000:]
    assert sum(len(s.trials) for s in studies_of(tmp_path, "claims_seeds")) == n_trials
    again_rows = list(csv.DictReader((out / "claims.csv").open()))
    assert [(r["claim_id"], r["setting"], r["diff"]) for r in again_rows if r["metric"] != "latency"] == \
        [(r["claim_id"], r["setting"], r["diff"]) for r in rows if r["metric"] != "latency"]


def test_claims_command_rejects_an_unknown_sweep_in_one_line(tmp_path: Path) -> None:
    proc = claims_cli("only=claims_nope", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: only=claims_nope: choose among {', '.join(SWEEPS)}"


def test_interval_digits_fit_their_width() -> None:
    from bnsweep.stats import fit_digits

    assert fit_digits(Interval(-0.0004, -0.001, 0.0002, 8), 100) == "-0.040 [-0.100, +0.020]"
    assert fit_digits(Interval(1.5, 1.25, 1.75, 3), signed=False) == "1.50 [1.25, 1.75]"
    assert "-0.0 " not in fit_digits(Interval(-0.00001, -0.00002, 0.0, 3)) and "±0.0" not in fit_digits(
        Interval(0.0, 0.0, 0.0, 3))
    assert math.isnan(Interval(math.nan, 0, 0, 0).estimate) and fit_digits(Interval(math.nan, 0, 0, 0)) == "-"
