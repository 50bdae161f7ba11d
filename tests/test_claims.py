"""The seeds' claims: verdicts and their power on crafted intervals, basins over several LR-search seeds on a
real Optuna study, and the claims table from a small real claims sweep run by ``bnsweep claims``."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import studies_of
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from bnsweep.report.basins import EDGE_OPEN, basin_diff, study_basin
from bnsweep.report.claims import CLAIM_COLUMNS, CLAIMS, Claim, verdict
from bnsweep.report.sentences import verdict as sentence
from bnsweep.report.stats import Interval, mean_ci
from bnsweep.sweep.basin import LR_KEY

# ---------------------------------------------------------------------- verdicts and the resolvable difference


def test_verdicts_and_half_width_on_crafted_intervals() -> None:
    up, down, wide = Interval(0.02, 0.01, 0.03, 8), Interval(-0.02, -0.03, -0.01, 8), Interval(-0.002, -0.009, 0.005, 8)
    assert (up.verdict, down.verdict, wide.verdict) == ("greater", "less", "not_resolved")
    assert wide.half_width == pytest.approx(0.007)
    text = sentence("best_val_acc", wide, "bn", "none", 0.9, "{:+.4f}")
    assert text.startswith("not resolved") and "smaller than ±0.0070 cannot be told apart with these seeds" in text
    assert "LR grid" in sentence("basin", Interval(0.1, -0.5, 0.7, 1, "bracket"), "bn", "none", 0.9, "{:+.2f}")
    assert Interval(0.9, 0.9, math.inf, 1, EDGE_OPEN).verdict == "not_resolved"  # even if clear of 0
    assert "edge open" in sentence("basin", Interval(0.9, 0.9, math.inf, 1, EDGE_OPEN), "bn", "none", 0.9)
    assert Interval(0.5, 0.1, 0.9, 1).verdict == "not_resolved"  # one seed: no CI, no conclusion

    more = Claim("x", "001", "s", "test_acc", "bn", "none", +1)
    fewer = Claim("x", "001", "s", "epochs_to_converge", "bn", "none", -1)
    assert (verdict(up, more), verdict(down, more), verdict(wide, more)) == ("supported", "contradicted",
                                                                             "not resolved")
    assert (verdict(down, fewer), verdict(up, fewer)) == ("supported", "contradicted")
    same = Claim("x", "002", "s", "precise_bn_gain", "bn", expect=0, how="within", margin=0.01)
    assert verdict(wide, same) == "supported"  # the whole interval within ±1 pp
    assert verdict(up, same) == "contradicted" and verdict(Interval(0.0, -0.05, 0.05, 8), same) == "not resolved"


def test_every_claim_of_the_brief_is_in_the_table() -> None:
    text = " ".join(c.claim.lower() for c in CLAIMS)
    for words in ("accuracy", "fewer epochs", "time per epoch", "learning rates", "initialization", "saturation",
                  "drift", "after the activation", "regulariz", "running averages", "adam"):
        assert words in text, words
    assert {c.study for c in CLAIMS} == {"claims_bn", "claims_init", "claims_optimizers"}


# ---------------------------------------------------------------------- basins over several seeds


def crafted_study(per_seed: dict[int, list[tuple[float, float]]], basin: dict | None) -> optuna.Study:
    """A real Optuna study of LR-search trials (seed, LR, best val acc) and one repeat, as the sweep stores them."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    if basin is not None:
        study.set_user_attr("basin", basin)
    dist = {LR_KEY: FloatDistribution(1e-4, 1e3, log=True)}
    for seed, points in per_seed.items():
        for lr, acc in points:
            study.add_trial(create_trial(params={LR_KEY: lr}, distributions=dist, value=acc, state=TrialState.COMPLETE,
                                         user_attrs={"seed": seed, "metrics": {"best_val_acc": acc}}))
    study.add_trial(create_trial(params={LR_KEY: 0.1}, distributions=dist, value=0.99, state=TrialState.COMPLETE,
                                 user_attrs={"seed": 1, "repeat": 1, "metrics": {"best_val_acc": 0.99}}))
    return study


def test_basin_over_several_seeds_is_the_mean_width_with_its_ci() -> None:
    limits = {"low": 1e-4, "high": 1e3, "resolution": 0.25, "seeds": 3}
    lrs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    wide = crafted_study({0: list(zip(lrs, [0.1, 0.96, 0.97, 0.96, 0.2], strict=True)),
                          1: list(zip(lrs, [0.1, 0.96, 0.97, 0.2, 0.2], strict=True)),
                          2: list(zip(lrs, [0.96, 0.96, 0.97, 0.96, 0.2], strict=True))}, limits)
    b = study_basin(wide, (1e-3, 10.0), 0.95)
    assert sorted(b.brackets) == [0, 1, 2] and b.main is b.brackets[0]
    widths = [b.brackets[s].width for s in (0, 1)]  # edges at the geometric midpoints of their brackets
    assert widths == [pytest.approx(3.0), pytest.approx(2.0)]
    assert b.brackets[2].lower_open and b.brackets[2].lower_lo == 1e-4  # seed 2 reached the lowest LR tried
    ci = mean_ci(widths)  # an open bracket is a bound, not a width: left out of the mean
    assert (b.width.estimate, b.width.low, b.width.high, b.width.n) == (pytest.approx(2.5), pytest.approx(ci.low),
                                                                        pytest.approx(ci.high), 2)
    assert "95% CI over 2 seeds" in b.describe()

    narrow = crafted_study({s: list(zip(lrs, [0.1, 0.1, 0.97, 0.2, 0.2], strict=True)) for s in (0, 1, 2)}, limits)
    d = basin_diff(b, study_basin(narrow, (1e-3, 10.0), 0.95))
    assert d.n == 2 and d.estimate == pytest.approx(1.5) and d.kind == "95% CI"  # paired by seed (0 and 1)

    # older studies: no seed on the LR-search trials, no basin attribute -> one bracket within the search range
    open_top = crafted_study({0: [(1e-2, 0.2), (1e-1, 0.97), (1.0, 0.97)]}, None)
    for t in open_top.get_trials():
        t.user_attrs.pop("seed", None)
    ob = study_basin(open_top, (1e-3, 1.0), 0.95)
    assert ob.width.kind == EDGE_OPEN and "≥ 1.00 dec., upper edge open at 1" in ob.describe()
    assert basin_diff(b, ob).kind == EDGE_OPEN and basin_diff(b, ob).sign == 0


# ---------------------------------------------------------------------- a small real claims sweep


SMALL = ["only=claims_bn", "workers=2", "sweep.n_trials=2", "sweep.repeats=2", "sweep.epochs=1",
         'overrides=["data.limit_train=1000","train.precise_bn=true"]']


def claims_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``bnsweep claims`` as a user runs it, from ``cwd`` (the driver writes its summary tables under reports/)."""
    return subprocess.run([sys.executable, "-m", "bnsweep", "claims", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})


def test_claims_command_runs_its_sweep_once_and_tests_the_claims(mlflow_server: str, tmp_path: Path) -> None:
    args = [*SMALL, f"tracking.uri={mlflow_server}", f"tracking.store_dir={tmp_path}", f"out_dir={tmp_path / 'r'}"]
    first = claims_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "r" / "claims" / "claims.csv").open()))
    assert list(rows[0]) == CLAIM_COLUMNS
    by_claim = {c.claim: c for c in CLAIMS}
    tested = [r for r in rows if r["study"] == "claims_bn"]
    assert {r["claim"] for r in tested} == {c.claim for c in CLAIMS if c.study == "claims_bn"}
    studies = {s.user_attrs["cell"]: s for s in studies_of(tmp_path, "claims_bn")}
    for r in tested:
        claim = by_claim[r["claim"]]
        assert r["verdict"] in ("supported", "contradicted", "not resolved")
        if claim.metric in ("test_acc", "epochs_to_converge", "s_per_epoch") and claim.how == "diff":
            # the row is the paired difference of the repeats stored in Optuna
            def per_seed(cell: str, key: str = claim.metric) -> dict[int, float]:
                return {t.user_attrs["seed"]: t.user_attrs["metrics"][key] for t in studies[cell].trials
                        if "repeat" in t.user_attrs and t.state == TrialState.COMPLETE}
            a, b = per_seed(f"placement={claim.first}"), per_seed(f"placement={claim.second}")
            diffs = [a[s] - b[s] for s in a if s in b]
            assert int(r["n"]) == len(diffs) == 2
            assert float(r["diff"]) == pytest.approx(sum(diffs) / 2)
            iv = mean_ci(diffs)
            assert r["verdict"] == verdict(iv, claim)
            if r["verdict"] == "not resolved" and math.isfinite(iv.half_width):
                assert float(r["resolvable"]) == pytest.approx(iv.half_width)
    for r in rows:
        if r["study"] != "claims_bn":  # not run: the row says what it needs
            assert r["verdict"] == "not resolved" and "needs the sweep" in r["note"]
    md = (tmp_path / "r" / "claims" / "claims.md").read_text()
    assert "## Claims" in md and md.count("**supported") + md.count("**contradicted") + md.count(
        "**not resolved") == len(rows)
    assert (tmp_path / "r" / "claims_bn" / "claims.csv").exists()  # the sweep's own report has its claims
    assert "## Claims" in (tmp_path / "r" / "claims_bn" / "report.md").read_text()

    n_trials = sum(len(s.trials) for s in studies.values())
    again = claims_cli(*args, cwd=tmp_path)  # resumable: nothing is trained again, the same rows come out
    assert again.returncode == 0, again.stderr[-3000:]
    assert sum(len(s.trials) for s in studies_of(tmp_path, "claims_bn")) == n_trials
    assert list(csv.DictReader((tmp_path / "r" / "claims" / "claims.csv").open())) == rows


# ---------------------------------------------------------------------- the derived per-repeat metrics


def test_saturation_and_drift_from_diagnostics_rows() -> None:
    from bnsweep.report.results import TrialResult, preact_summary

    def rows(p50: list[float], spread: list[float]) -> list[dict]:
        return [{"step": 10 * i, "epoch": 1, "layer": layer, "p15": m - s / 2, "p50": m, "p85": m + s / 2,
                 "grad_norm": 1.0}
                for i, (m, s) in enumerate(zip(p50, spread, strict=True)) for layer in ("fc1", "fc2")]

    steady = preact_summary(rows([0.0] * 4, [2.0] * 4))
    assert steady == {"preact_extent": pytest.approx(1.0), "preact_drift": pytest.approx(0.0)}
    moving = preact_summary(rows([0.0, 1.0, 3.0, 5.0], [2.0, 3.0, 5.0, 6.0]))
    assert moving["preact_drift"] == pytest.approx((5.0 + 4.0) / 2.0)  # |Δ median| + |Δ spread|, per first spread
    assert moving["preact_extent"] == pytest.approx(((3.0 + 2.5) + (5.0 + 3.0)) / 2)  # last half: max |p15|, |p85|
    out = [{"step": 0, "epoch": 1, "layer": "out", "p15": math.nan, "p50": math.nan, "p85": math.nan, "grad_norm": 1}]
    assert math.isnan(preact_summary(out)["preact_drift"])  # the logits have no activation

    t = TrialResult(1, 0.1, "complete", {"test_acc": 0.9, "final_train_acc": 0.95}, None, repeat=1,
                    val_acc=[0.5, 0.8, 0.9], diagnostics=rows([0.0] * 4, [2.0] * 4))
    assert t.value("train_test_gap") == pytest.approx(0.05) and t.value("preact_extent") == pytest.approx(1.0)
    assert t.epochs == [1.0, 2.0, 3.0]  # no val_epoch logged: one point per epoch
    t.val_epoch = [0.5, 1.0, 1.5]  # fractional validation checks: the curve's x
    assert t.epochs == [0.5, 1.0, 1.5]


def test_claims_command_rejects_an_unknown_sweep_in_one_line(tmp_path: Path) -> None:
    proc = claims_cli("only=claims_nope", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("error: only=claims_nope: choose among claims_bn, claims_init, "
                                                    "claims_optimizers")
