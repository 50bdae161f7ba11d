"""The study report: ``bnsweep report sweep=<name>`` (or ``make report SWEEP=<name>``).

Reads a finished (or running) sweep from its Optuna storage and MLflow, never trains, and answers the
seeds' questions with numbers: BN vs no BN per activation (and init, optimizer...) in best accuracy,
epochs to target, cost per epoch and LR-basin width, each with a 95% CI from the repeats (extra
seeds at each cell's best LR, paired by seed) or, for the basin, the LR grid's bracket. A sentence
states a conclusion only where its interval excludes 0. Writes ``reports/<sweep>/report.{md,html}``
and PNG figures, and logs them to the sweep's ``summary`` MLflow run. How to read it: docs/report.md.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from bnsweep.defaults import CONF_DIR
from bnsweep.errors import ConfigError, check_name, run_app
from bnsweep.report import figures
from bnsweep.report.export import ANSWER_COLUMNS, BASIN_COLUMNS, answer_rows, basin_rows, write_csv
from bnsweep.report.results import METRICS, CellResult, Layout, collect_cell, comparisons, fetch_mlflow
from bnsweep.report.sentences import KEYS_BETWEEN, KEYS_VS_BASE, compose
from bnsweep.sweep import files
from bnsweep.sweep.basin import search_limits
from bnsweep.sweep.storage import default_storage, open_storage, sweep_studies
from bnsweep.tracking.dashboard import VIEW_TAG, runs_table_url
from bnsweep.tracking.runs import get_or_create_experiment, summary_run
from bnsweep.tracking.server import connect


def combined_study(cells: Sequence[CellResult], layout: Layout, search_range: tuple[float, float]) -> optuna.Study:
    """All cells' completed LR-search trials in one in-memory study: grid keys as categorical params."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {
        k: optuna.distributions.CategoricalDistribution(v) for k, v in layout.values.items() if len(v) > 1}
    has_lr = all(math.isfinite(x) and x > 0 for x in search_range)  # else the sweep searched another key
    if has_lr:
        dists["lr"] = optuna.distributions.FloatDistribution(*search_range, log=True)
    study = optuna.create_study(direction="maximize")
    for c in cells:
        for t in c.trials:
            if t.state == "complete" and (not has_lr or search_range[0] <= t.lr <= search_range[1]):
                params = {k: c.labels[k] for k in dists if k != "lr"} | ({"lr": t.lr} if has_lr else {})
                study.add_trial(optuna.trial.create_trial(value=t.metrics.get("best_val_acc", 0.0), params=params,
                                                          distributions=dists))
    return study


def render(name: str, attrs: dict[str, Any], cells: Sequence[CellResult], out: Path, dpi: int,
           link: str) -> list[Path]:
    """Figures, report.md and report.html for collected cells; returns the files written."""
    target, search_range = float(attrs["target_acc"]), attrs["search_range"]
    layout = Layout.of(cells, list(attrs.get("grid") or {}))
    vs_base, between = comparisons(cells, layout)
    out.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    if vs_base or between:
        figs["verdicts"] = figures.verdict_matrix(
            [*[(c, KEYS_VS_BASE) for c in vs_base], *[(c, KEYS_BETWEEN) for c in between]],
            [(k, lab) for k, lab, _ in METRICS if k in KEYS_VS_BASE], out / "verdicts.png", dpi)
    figs["heatmap"] = figures.heatmaps(cells, layout, out / "heatmap.png", dpi)
    if vs_base or between:
        figs["effects"] = figures.effects([*vs_base, *between], [(k, f"Δ {lab}") for k, lab, _ in METRICS
                                                                 if k != "test_acc"], out / "effects.png", dpi)
    figs["lr_curves"] = figures.lr_curves(cells, layout, target, search_range, out / "lr_curves.png", dpi)
    figs["learning_curves"] = figures.learning_curves(cells, layout, target, out / "learning_curves.png", dpi)
    figs["epochs_time"] = figures.epochs_and_time(cells, layout, target, out / "epochs_time.png", dpi)
    notes = {}
    made, note = figures.importance_and_slice(combined_study(cells, layout, search_range), out / "importance.png",
                                              out / "slice.png", dpi)
    figs |= {p.stem: p for p in made}
    if note:
        notes["optuna"] = note
    diag = figures.diagnostics(cells, layout, out / "diag_preact.png", out / "diag_grad.png", dpi)
    figs |= {p.stem: p for p in diag}
    if not diag:
        notes["diagnostics"] = ("No diagnostics: this sweep ran with train.diagnostics=false (add it to the "
                                "sweep's base, as sweeps/report.yaml does).")
    doc = compose(name, attrs, cells, layout, vs_base, between, figs, notes, link)
    (out / "report.md").write_text(doc.to_markdown())
    (out / "report.html").write_text(doc.to_html())
    csvs = [write_csv(out / "answers.csv", ANSWER_COLUMNS, answer_rows(vs_base, between, target)),
            write_csv(out / "basins.csv", BASIN_COLUMNS, basin_rows(cells))]
    return [out / "report.md", out / "report.html", *figs.values(), *csvs]


def collect(name: str, url: str, tracking: DictConfig, diagnostics_of: Any = None
            ) -> tuple[dict[str, Any], list[CellResult], MlflowClient, str]:
    """A sweep's study attributes, its cells (Optuna storage ``url``) with their MLflow histories, the client, URI.

    ``diagnostics_of(cell, trial)``: whose diagnostics.csv to fetch besides the best trials' (default: repeats).
    """
    studies = sorted(sweep_studies(open_storage(url), name), key=lambda s: s.user_attrs.get("order", 0))
    if not studies:
        raise ConfigError(f"sweep={name!r} has no results in {url}; run it first (bnsweep sweep sweep={name})")
    attrs = dict(studies[0].user_attrs)  # what the sweep ran with (the file may have changed since)
    search_range = search_limits(attrs, (math.nan, math.nan))
    attrs["search_range"] = search_range
    target = float(attrs["target_acc"])
    cells = [collect_cell(s, search_range, target) for s in studies]
    uri = connect(tracking)
    client = MlflowClient(uri)
    fetch_mlflow(client, cells, diagnostics_of)
    return attrs, cells, client, uri


def make_report(cfg: DictConfig) -> Path:
    """Read the sweep ``cfg.sweep.name`` from its storage and MLflow; write (and log) its report."""
    start = time.perf_counter()
    name = check_name("sweep.name", cfg.sweep.name)
    url = cfg.storage or default_storage(Path(cfg.tracking.store_dir).resolve(), name)
    attrs, cells, client, uri = collect(name, url, cfg.tracking)
    attrs["description"] = cfg.sweep.get("description", "")
    experiment_id = get_or_create_experiment(client, attrs["mlflow_experiment"], None)
    link = runs_table_url(uri, experiment_id, view=VIEW_TAG in client.get_experiment(experiment_id).tags)
    out = Path(cfg.out_dir) / name.replace("/", "_")
    files = render(name, attrs, cells, out, int(cfg.dpi), link)
    if cfg.log_to_mlflow:
        run_id = summary_run(client, experiment_id, name)
        for f in files:
            client.log_artifact(run_id, str(f), "report")
    took = time.perf_counter() - start
    print(f"report: {out / 'report.html'} (+ report.md, CSVs, {sum(f.suffix == '.png' for f in files)} figures) in "
          f"{took:.1f} s"
          + (f"; logged to the summary run of {link}" if cfg.log_to_mlflow else ""), file=sys.stderr)
    return out


@files.finding_files
@hydra.main(config_path=CONF_DIR, config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """``bnsweep report``."""
    run_app(make_report, cfg)
