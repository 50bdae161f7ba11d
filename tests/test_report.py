"""The study report from a real tiny sweep: files, figures, numbers, MLflow artifacts, and Chromium rendering."""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import ROOT, RunIf, chromium_exe, studies_of
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import stats as sps

from bnsweep.stats import mean_ci, paired_diff
from bnsweep.sweep.basin import Basin, bracket
from bnsweep.sweep.slots import is_repeat
from bnsweep.sweep.storage import default_storage, open_storage, sweep_studies

PNG = b"\x89PNG\r\n\x1a\n"
LABELS = {"best_val_acc": "best val acc", "epochs_to_converge": "epochs to target", "s_per_epoch": "s/epoch",
          "time_to_target": "time to target (s)", "basin": "LR basin (decades)"}
FIGURES = {"verdicts", "heatmap", "effects", "lr_curves", "learning_curves", "epochs_time", "importance", "slice",
           "diag_preact", "diag_grad"}


def report_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnsweep.report", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})


@pytest.fixture(scope="module")
def report(tiny_sweep: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert tiny_sweep.result.returncode == 0, tiny_sweep.result.stderr[-3000:]
    out_dir = tmp_path_factory.mktemp("reports")
    start = time.perf_counter()
    proc = report_cli("sweep=tiny", f"sweep.name={tiny_sweep.name}", f"tracking.uri={tiny_sweep.uri}",
                      f"tracking.store_dir={tiny_sweep.store}", f"out_dir={out_dir}")
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\nreport of the tiny sweep: {wall:.1f} s for the whole command; {proc.stderr.strip().splitlines()[-1]}")
    return out_dir / tiny_sweep.name


def check_png(path: Path, min_size: tuple[int, int] = (200, 150)) -> np.ndarray:
    """A real PNG: the signature, a full decode, a sensible size, and not a single flat colour."""
    data = path.read_bytes()
    assert data[:8] == PNG, path
    with Image.open(path) as im:
        im.load()
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 5, f"{path.name} is blank"
    return pixels


def test_every_figure_is_a_valid_png_and_linked(report: Path) -> None:
    pngs = {p.stem: p for p in report.glob("*.png")}
    assert set(pngs) == FIGURES
    for p in pngs.values():
        check_png(p)
    md = (report / "report.md").read_text()
    assert set(re.findall(r"\]\((\w+)\.png\)", md)) == FIGURES
    html = (report / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(FIGURES)  # self-contained


def test_report_states_the_paired_bn_difference_as_computed_from_the_repeats(report: Path,
                                                                            tiny_sweep: SimpleNamespace) -> None:
    """The report's numbers are the seed-paired differences of the repeats stored in Optuna, and its verdicts
    scipy's tests of them: a paired t-test for accuracy, a sign test on the orderings for epochs to target."""
    studies = {s.user_attrs["cell"]: s for s in
               sweep_studies(open_storage(default_storage(tiny_sweep.store, tiny_sweep.name)), tiny_sweep.name)}

    def by_seed(cell: str, key: str) -> dict[int, float]:
        return {t.user_attrs["seed"]: t.user_attrs["metrics"][key] for t in studies[cell].trials if is_repeat(t)}

    md = (report / "report.md").read_text()
    bn, none = by_seed("placement=before_act", "best_val_acc"), by_seed("placement=none", "best_val_acc")
    assert sorted(bn) == sorted(none) == [1, 2]
    diffs = np.array([bn[s] - none[s] for s in sorted(bn)])
    line = next(x for x in md.splitlines() if x.startswith("- best val acc:"))
    assert "n=2 (paired t-test; Holm p = " in line
    text = line.split(":")[1].split("pp")[0].strip()  # the digits the interval allows
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert float(text) == pytest.approx(diffs.mean() * 100, abs=0.51 * 10 ** -decimals)
    p = sps.ttest_1samp(diffs, 0).pvalue if diffs.std() > 0 else 1.0  # one comparison: Holm changes nothing
    assert ("not resolved" in line) == (not p < 0.05), line

    conv = {c: {t.user_attrs["seed"]: (t.user_attrs["metrics"]["epochs_to_converge"],
                                       bool(t.user_attrs["metrics"]["converged"]))
                for t in studies[c].trials if is_repeat(t)} for c in ("placement=before_act", "placement=none")}
    line = next(x for x in md.splitlines() if x.startswith("- epochs to target:"))
    reached = sum(r for _, r in conv["placement=before_act"].values())
    if "no repeat of either cell reached" not in line:
        assert f"reached the target: {reached}/2" in line and "paired sign test for censored values" in line
    assert "budget + 1" not in md  # a run that never got there is censored, never averaged
    basin = next(x for x in md.splitlines() if x.startswith("- LR basin (decades):"))
    assert "→ **not resolved" in basin  # one LR-search seed: a bracket, never a verdict


def test_answers_and_basins_csv_say_what_the_report_says(report: Path, tiny_sweep: SimpleNamespace) -> None:
    from bnsweep.report.export import ANSWER_COLUMNS, BASIN_COLUMNS

    answers = list(csv.DictReader((report / "answers.csv").open()))
    assert answers and list(answers[0]) == ANSWER_COLUMNS
    md = (report / "report.md").read_text()
    answers_md = md.split("## Answers")[1].split("## Repeats")[0]
    lines = [x for x in answers_md.splitlines() if x.startswith("- ") and "→ **" in x]
    assert len(lines) == len(answers)  # one row per comparison line, in the report's order
    for row, line in zip(answers, lines, strict=True):
        assert line.startswith(f"- {LABELS[row['metric']]}:")
        assert (row["verdict"] == "not_resolved") == ("not resolved" in line), (row, line)
        lo, hi, n = float(row["lo"] or "nan"), float(row["hi"] or "nan"), int(row["n"])
        if row["verdict"] != "not_resolved":
            assert n >= 2  # never a verdict from one seed
        if row["verdict"] == "greater" and row["metric"] in ("best_val_acc", "s_per_epoch"):
            assert lo > 0  # a t-test: Holm's p < 0.05 implies the uncorrected 95% CI excludes 0
        elif row["verdict"] == "less" and row["metric"] in ("best_val_acc", "s_per_epoch"):
            assert hi < 0
        elif math.isfinite(hi - lo) and hi > lo and "cannot be told apart" in line:  # the power, stated
            scale = 100 if row["metric"] == "best_val_acc" else 1
            assert f"±{(hi - lo) / 2 * scale:.2g}" in line, line

    basins = list(csv.DictReader((report / "basins.csv").open()))
    assert [list(b) for b in basins][0] == BASIN_COLUMNS and len(basins) == 2
    target = 0.8
    for b in basins:
        (study,) = [s for s in studies_of(tiny_sweep.store, tiny_sweep.name) if s.user_attrs["cell"] == b["cell"]]
        reached = [t.params["optimizer.lr"] for t in study.trials if "repeat" not in t.user_attrs
                   and t.state.name == "COMPLETE" and t.user_attrs["metrics"]["best_val_acc"] >= target]
        if not reached:
            assert b["lower_hi"] == "" and b["width"] == ""
            continue
        assert float(b["lower_hi"]) == min(reached) and float(b["upper_lo"]) == max(reached)
        assert b["lower_open"] in ("true", "false") and b["upper_open"] in ("true", "false")
        assert float(b["lower_lo"]) <= float(b["lower_hi"]) <= float(b["upper_lo"]) <= float(b["upper_hi"])
        assert float(b["width_lo"]) <= float(b["width"]) <= float(b["width_hi"]) and b["seeds"] == "1"
        closed = b["lower_open"] == b["upper_open"] == "false"
        assert closed == math.isfinite(float(b["width_hi"]))  # an open edge: the width is only a lower bound


def test_report_is_logged_to_the_sweeps_summary_run(report: Path, tiny_sweep: SimpleNamespace) -> None:
    client = MlflowClient(tiny_sweep.uri)
    exp = client.get_experiment_by_name(f"sweep-{tiny_sweep.name}")
    (run,) = client.search_runs([exp.experiment_id], "tags.`bnsweep.role` = 'summary'")
    arts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report.md", "report.html", "answers.csv", "basins.csv"} | {f"{f}.png" for f in FIGURES} <= arts


def test_trials_log_diagnostics_per_layer(tiny_sweep: SimpleNamespace, tmp_path: Path) -> None:
    from bnsweep.training.diagnostics import read_csv

    client = MlflowClient(tiny_sweep.uri)
    exp = client.get_experiment_by_name(f"sweep-{tiny_sweep.name}")
    run = client.search_runs([exp.experiment_id], "tags.`bnsweep.role` = 'trial'", max_results=1)[0]
    rows = read_csv(Path(client.download_artifacts(run.info.run_id, "diagnostics.csv", str(tmp_path))).read_text())
    assert {r["layer"] for r in rows} == {"fc1", "out"}  # tiny: one hidden layer, then the logits
    steps = sorted({r["step"] for r in rows})
    assert steps[0] == 0 and all(b - a == 5 for a, b in zip(steps, steps[1:], strict=False))
    for r in rows:
        assert r["grad_norm"] > 0
        if r["layer"] == "fc1":
            assert r["p15"] <= r["p50"] <= r["p85"]
        else:
            assert math.isnan(r["p50"])  # the logits have no activation


@RunIf(chromium=True)
def test_report_html_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    exe = chromium_exe()
    shot = tmp_path / "report.png"
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           "--window-size=1280,2000", (report / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert shot.exists(), proc.stderr[-2000:]
    pixels = check_png(shot, (1280, 2000))
    not_white = (pixels < 245).any(axis=2).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert not_white > 0.02 and colours > 50, (not_white, colours)  # text, tables and figures, not an empty page


def test_report_of_a_sweep_that_never_ran_is_one_line(mlflow_server: str, tmp_path: Path) -> None:
    proc = report_cli("sweep=tiny", "sweep.name=t_never", f"tracking.uri={mlflow_server}",
                      f"tracking.store_dir={tmp_path}", f"out_dir={tmp_path}", timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: sweep='t_never' has no results in ")


# ---------------------------------------------------------------------- the interval arithmetic


def test_mean_ci_matches_scipy_t_interval() -> None:
    values = [0.912, 0.934, 0.921, 0.951, 0.927]
    iv = mean_ci(values)
    lo, hi = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert iv.n == 5 and iv.estimate == pytest.approx(np.mean(values))
    assert (iv.low, iv.high) == (pytest.approx(lo), pytest.approx(hi))
    assert iv.low > 0  # all well above 0
    assert math.isnan(mean_ci([0.9]).low) and mean_ci([0.9]).n == 1  # one value: no interval
    assert mean_ci([0.9, math.nan, 0.8]).n == 2


def test_paired_difference_matches_scipy_ttest_rel() -> None:
    a = {1: 0.95, 2: 0.97, 3: 0.96, 4: 0.99}
    b = {1: 0.93, 2: 0.94, 3: 0.96, 4: 0.95, 5: 0.5}  # seed 5 has no partner: left out
    iv = paired_diff(a, b)
    ci = sps.ttest_rel([a[k] for k in (1, 2, 3, 4)], [b[k] for k in (1, 2, 3, 4)]).confidence_interval(0.95)
    assert iv.n == 4 and iv.estimate == pytest.approx(0.0225)
    assert (iv.low, iv.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    iv = paired_diff({1: 0.9, 2: 0.8}, {1: 0.8, 2: 0.9})
    assert iv.low < 0 < iv.high  # the CI includes 0


# ---------------------------------------------------------------------- any grid shape (no training)


def fake_cells(grid: dict[str, list[str]], gain: dict[str, float]) -> list:
    """Cells with LR curves, seed-paired repeats and diagnostics; ``gain`` adds accuracy per grid label."""
    from bnsweep.report.results import CellResult, TrialResult
    from bnsweep.sweep import table

    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.002, 5)  # the same per-seed noise in every cell: pairing removes it
    cells = []
    for combo in itertools.product(*grid.values()):
        labels = dict(zip([k.rsplit(".", 1)[-1] for k in grid], combo, strict=True))
        top = 0.85 + sum(gain.get(v, 0.0) for v in combo)
        lrs = np.logspace(-3, 1, 6)
        accs = top - 0.1 * (np.log10(lrs) + 1) ** 2
        trials = [TrialResult(i, float(lr), "complete", {"best_val_acc": float(a), "test_acc": float(a) - 0.01,
                                                        "epochs_to_converge": 2, "s_per_epoch": 0.5, "converged": 1},
                              None) for i, (lr, a) in enumerate(zip(lrs, accs, strict=True))]
        best = max(trials, key=lambda t: t.metrics["best_val_acc"])
        own = rng.normal(0, 0.0005, 5)  # and a little of each cell's own, so paired differences have spread
        repeats = [TrialResult(10 + k, best.lr, "complete", {**best.metrics, "best_val_acc": top + noise[k - 1]
                                                             + own[k - 1]}, None, repeat=k, seed=k,
                               val_acc=[top - 0.2, top - 0.05, top]) for k in (1, 2, 3, 4, 5)]
        diag = [{"step": s, "epoch": 1, "layer": layer, "p15": -1.0 - s / 100, "p50": 0.0, "p85": 1.0 + s / 100,
                 "grad_norm": 1.0 / (s + 1)} for s in range(0, 100, 10) for layer in ("fc1", "fc2")]
        name = ",".join(f"{k}={v}" for k, v in labels.items())
        row = {k: math.nan for k in table.COLUMNS} | {"cell": name, "best_lr": best.lr, "best_val_acc": top,
                                                         "test_acc": top - 0.01}
        basin = Basin({0: bracket([(float(lr), a >= 0.8) for lr, a in zip(lrs, accs, strict=True)], 1e-3, 10.0)},
                      1e-3, 10.0, 0)
        cells.append(CellResult(name, labels, row, trials, repeats, best, basin, diag))
    return cells


@pytest.mark.parametrize("grid", [
    {"model.bn.placement": ["none", "before_act"], "model.activation": ["sigmoid", "relu"],
     "model.init": ["he_normal", "normal"]},
    {"optimizer": ["sgd", "adam", "rmsprop"]},
])
def test_report_renders_any_grid_shape(grid: dict[str, list[str]], tmp_path: Path) -> None:
    from bnsweep.report.build import render

    attrs = {"target_acc": 0.8, "search_range": (1e-3, 10.0), "grid": dict.fromkeys(grid), "n_trials": 6,
             "epochs": 3, "repeats": 5, "sampler": {"name": "grid"}, "description": "synthetic"}
    files = render("synthetic", attrs, fake_cells(grid, {"before_act": 0.05, "adam": 0.03}), tmp_path, 60, "-")
    assert {f.stem for f in files if f.suffix == ".png"} == FIGURES
    for f in files:
        if f.suffix == ".png":
            check_png(f, (100, 80))
    md = (tmp_path / "report.md").read_text()
    if "model.init" in grid:  # facets: one heatmap row per init, a comparison per (activation, init)
        assert "### activation=relu, init=normal" in md
        assert md.count("Does BN help? before_act vs none") == 4
        assert md.count("before_act is more accurate than none") == 4  # +0.05 on every paired seed
    else:  # no BN key: the first key's values are compared with its first value, without BN wording
        assert "Does BN help?" not in md and "**adam vs sgd**" in md
        assert "adam is more accurate than sgd" in md
        rms = md.split("**rmsprop vs sgd**")[1]
        line = next(x for x in rms.splitlines() if x.startswith("- best val acc:"))
        assert "not resolved" in line  # rmsprop - sgd: no difference but noise


def test_a_batch_size_grid_is_compared_within_and_across_batch_sizes(tmp_path: Path) -> None:
    """kind x batch size: kinds within each batch size, and each batch size against the one nearest
    optimizer.reference_batch (32: here 16) within each kind."""
    from bnsweep.report.build import render

    grid = {"model.norm.kind": ["none", "batch", "group"], "data.batch_size": ["2", "16", "256"]}
    attrs = {"target_acc": 0.8, "search_range": (1e-3, 10.0), "grid": dict.fromkeys(grid), "n_trials": 6,
             "epochs": 1, "repeats": 5, "sampler": {"name": "grid"}, "description": "synthetic"}
    render("synthetic", attrs, fake_cells(grid, {"group": 0.05, "2": -0.03}), tmp_path, 60, "-")
    md = (tmp_path / "report.md").read_text()
    assert "### batch_size=2" in md and "**Which normalization? batch vs group**" in md
    assert "**Does normalization help? group vs none**" in md and "Does BN help?" not in md
    for kind in ("none", "batch", "group"):
        across = md.split(f"### kind={kind}\n")[1].split("###")[0]
        assert "**batch_size=2 vs batch_size=16**" in across and "**batch_size=256 vs batch_size=16**" in across
        assert "batch_size=2 is less accurate than batch_size=16" in across  # -0.03 on every paired seed
