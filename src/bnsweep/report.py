"""The study report: ``python -m bnsweep.report sweep=<name>`` (or ``make report SWEEP=<name>``).

Reads a finished (or running) sweep from its Optuna storage and MLflow, never trains, and answers the
seeds' questions with numbers: BN vs no BN per activation (and init, optimizer...) in best accuracy,
epochs to target, cost per epoch and LR-basin width, each with a 95% CI from the repeats (extra
seeds at each cell's best LR, paired by seed) or, for the basin, the LR grid's bracket. A sentence
states a conclusion only where its interval excludes 0. Writes ``reports/<sweep>/report.{md,html}``
and PNG figures, and logs them to the sweep's ``summary`` MLflow run. How to read it: docs/report.md.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial

from bnsweep import figures, summary
from bnsweep.answers import METRICS, compose
from bnsweep.diagnostics import ARTIFACT as DIAGNOSTICS
from bnsweep.diagnostics import read_csv
from bnsweep.errors import ConfigError, run_app
from bnsweep.stats import Interval, basin_bracket, bracket_diff, paired_diff
from bnsweep.studies import best_trial, is_repeat
from bnsweep.sweep import CONF_DIR, Sweep, open_sweep
from bnsweep.sweepdef import _label

LR = summary.LR_KEY
log = logging.getLogger("bnsweep.report")

# ---------------------------------------------------------------------- what a sweep holds


@dataclass
class TrialResult:
    number: int
    lr: float
    state: str  # complete | pruned | diverged | failed | running | waiting
    metrics: dict[str, float]
    run_id: str | None
    repeat: int | None = None  # k of a repeat (seed + k at the best LR); None for an LR-search trial
    val_acc: list[float] = field(default_factory=list)  # per epoch; fetched for best trials and repeats

    @classmethod
    def of(cls, t: FrozenTrial) -> TrialResult:
        state = "diverged" if t.user_attrs.get("diverged") else t.state.name.lower().replace("fail", "failed")
        return cls(t.number, float(t.params.get(LR, math.nan)), state, dict(t.user_attrs.get("metrics") or {}),
                   (t.user_attrs.get("run") or {}).get("mlflow_run_id"), t.user_attrs.get("repeat"))

    def value(self, key: str) -> float:
        if key == "time_to_target":  # censored runs count budget + 1 epochs, as epochs_to_converge does
            return self.metrics.get("epochs_to_converge", math.nan) * self.metrics.get("s_per_epoch", math.nan)
        return float(self.metrics.get(key, math.nan))


@dataclass
class CellResult:
    name: str
    labels: dict[str, str]  # short grid key -> value label, in grid order
    row: dict[str, Any]  # summary.cell_row: the LR search's answer
    trials: list[TrialResult]  # the LR search
    repeats: list[TrialResult]  # finished repeats at the best LR
    best: TrialResult | None
    basin: Interval
    diagnostics: list[dict[str, Any]] | None = None
    waiting: int = 0  # trials (LR search or repeats) not finished yet

    def repeat_values(self, key: str) -> dict[int, float]:
        """Repeat k -> its value: what paired comparisons pair on (the same seed in every cell)."""
        return {t.repeat: v for t in self.repeats if math.isfinite(v := t.value(key))}

    def best_value(self, key: str) -> float:
        return self.best.value(key) if self.best else math.nan


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The grid keys as cell names spell them (sweepdef.SweepSpec.cells)."""
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    return short if len(set(short.values())) == len(keys) else {k: k for k in keys}


def collect_cell(study: optuna.Study, search_range: tuple[float, float], target: float) -> CellResult:
    trials = study.get_trials(deepcopy=False)
    grid = study.user_attrs.get("grid") or {}
    short = _short_keys(list(grid))
    labels = {short[k]: _label(v) for k, v in grid.items()} or {"cell": study.user_attrs.get("cell", "all")}
    search = [TrialResult.of(t) for t in trials if not is_repeat(t)]
    repeats = [TrialResult.of(t) for t in trials if is_repeat(t) and t.state.is_finished() and t.user_attrs.get(
        "metrics")]
    best = best_trial(trials)
    measured = [t for t in search if t.state in ("complete", "pruned", "diverged") and t.metrics and t.lr > 0]
    basin = basin_bracket([t.lr for t in measured], [t.metrics.get("best_val_acc", 0.0) for t in measured],
                          target, *search_range)
    return CellResult(study.user_attrs.get("cell", study.study_name), labels, summary.cell_row(study, target),
                      search, repeats, next((t for t in search if best and t.number == best.number), None), basin,
                      waiting=sum(not t.state.is_finished() for t in trials))


def fetch_mlflow(sweep: Sweep, cells: Sequence[CellResult]) -> None:
    """val_acc histories of each best trial and repeat, and the best trial's diagnostics, in parallel."""
    jobs: list[Callable[[], None]] = []

    def history(t: TrialResult) -> None:
        t.val_acc = [m.value for m in sorted(sweep.client.get_metric_history(t.run_id, "val_acc"),
                                             key=lambda m: m.step)]

    def diag(c: CellResult, run_id: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = sweep.client.download_artifacts(run_id, DIAGNOSTICS, tmp)
            except Exception:  # diagnostics were off for this sweep: no such artifact
                return
            c.diagnostics = read_csv(Path(path).read_text())

    for c in cells:
        for t in [c.best, *c.repeats]:
            if t and t.run_id:
                jobs.append(lambda t=t: history(t))
        if c.best and c.best.run_id:
            jobs.append(lambda c=c: diag(c, c.best.run_id))
    with ThreadPoolExecutor(max_workers=8) as pool:
        for f in [pool.submit(j) for j in jobs]:
            try:
                f.result()
            except Exception as e:  # a deleted run: its curve is missing, the report goes on
                log.warning("MLflow: %s", str(e).splitlines()[0][:300])


# ---------------------------------------------------------------------- layout and comparisons


@dataclass
class Layout:
    """Rows: the BN key (else the first gridded key); columns: the other keys' combinations (groups)."""

    keys: list[str]
    values: dict[str, list[str]]
    row: str
    col: str | None
    facet_keys: list[str]
    baseline: str
    bn: bool = True  # the rows are BN variants (else the first gridded key, compared the same way)
    groups: list[str] = field(default_factory=list)
    facets: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, cells: Sequence[CellResult], grid_keys: Sequence[str]) -> Layout:
        keys = list(cells[0].labels)
        values = {k: list(dict.fromkeys(c.labels[k] for c in cells)) for k in keys}
        short = _short_keys(list(grid_keys))
        bn = [short[k] for k in grid_keys if k == "model.bn" or k.startswith("model.bn.")]
        row = bn[0] if bn else keys[0]
        others = [k for k in keys if k != row]
        col = "activation" if "activation" in others else (others[0] if others else None)
        baseline = next((v for v in values[row] if v in ("none", "false")), values[row][0])
        layout = cls(keys, values, row, col, [k for k in others if k != col], baseline, bool(bn))
        layout.groups = list(dict.fromkeys(layout.group(c) for c in cells))
        layout.facets = list(dict.fromkeys(layout.facet_of(c) for c in cells))
        return layout

    @property
    def rows(self) -> list[str]:
        return self.values[self.row]

    @property
    def col_values(self) -> list[str]:
        return self.values[self.col] if self.col else []

    def group(self, c: CellResult) -> str:
        return ", ".join(f"{k}={c.labels[k]}" for k in self.keys if k != self.row) or "all"

    def col_of(self, c: CellResult) -> str:
        return c.labels[self.col] if self.col else ""

    def facet_of(self, c: CellResult) -> str:
        return ", ".join(f"{k}={c.labels[k]}" for k in self.facet_keys)


@dataclass
class Comparison:
    """Cell a minus cell b (same group), paired by seed; the basin by its bracket."""

    group: str
    a: CellResult
    b: CellResult
    a_label: str
    b_label: str
    deltas: dict[str, Interval]

    @classmethod
    def of(cls, group: str, a: CellResult, b: CellResult, row: str) -> Comparison:
        deltas = {k: paired_diff(a.repeat_values(k), b.repeat_values(k)) for k, *_ in METRICS if k != "basin"}
        deltas["basin"] = bracket_diff(a.basin, b.basin)
        return cls(group, a, b, a.labels[row], b.labels[row], deltas)


def comparisons(cells: Sequence[CellResult], layout: Layout) -> tuple[list[Comparison], list[Comparison]]:
    """Per group: every BN variant vs the baseline, and the BN variants against each other."""
    vs_base, between = [], []
    for g in layout.groups:
        by_row = {c.labels[layout.row]: c for c in cells if layout.group(c) == g}
        base = by_row.get(layout.baseline)
        variants = [r for r in layout.rows if r in by_row and r != layout.baseline]
        if base:
            vs_base += [Comparison.of(g, by_row[v], base, layout.row) for v in variants]
        between += [Comparison.of(g, by_row[a], by_row[b], layout.row)
                    for i, a in enumerate(variants) for b in variants[i + 1:]]
    return vs_base, between


# ---------------------------------------------------------------------- the command


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
    figs: dict[str, Path] = {"heatmap": figures.heatmaps(cells, layout, out / "heatmap.png", dpi)}
    if vs_base or between:
        figs["effects"] = figures.effects([*vs_base, *between], [(k, f"Δ {lab}") for k, lab, _, _ in METRICS
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
    return [out / "report.md", out / "report.html", *figs.values()]


def make_report(cfg: DictConfig) -> Path:
    start = time.perf_counter()
    sweep = open_sweep(cfg)
    studies = sorted(sweep.studies, key=lambda s: s.user_attrs.get("order", 0))
    if not studies:
        raise ConfigError(f"sweep={sweep.spec.name!r} has no results in {sweep.storage_url}; run it first "
                          f"(make sweep SWEEP={sweep.spec.name})")
    attrs = dict(studies[0].user_attrs)  # what the sweep ran with (the file may have changed since)
    attrs["description"] = sweep.spec.description
    dist = optuna.distributions.json_to_distribution(attrs["search"][LR]) if LR in attrs["search"] else None
    search_range = (dist.low, dist.high) if dist is not None else (math.nan, math.nan)
    attrs["search_range"] = search_range
    target = float(attrs["target_acc"])
    cells = [collect_cell(s, search_range, target) for s in studies]
    fetch_mlflow(sweep, cells)
    out = Path(cfg.out_dir) / sweep.spec.name.replace("/", "_")
    files = render(sweep.spec.name, attrs, cells, out, int(cfg.dpi),
                   f"{sweep.uri}/#/experiments/{sweep.experiment_id}")
    if cfg.log_to_mlflow:
        run_id = sweep.summary_run()
        for f in files:
            sweep.client.log_artifact(run_id, str(f), "report")
    took = time.perf_counter() - start
    print(f"report: {out / 'report.html'} (+ report.md, {len(files) - 2} figures) in {took:.1f} s"
          + (f"; logged to the summary run of {sweep.uri}/#/experiments/{sweep.experiment_id}"
             if cfg.log_to_mlflow else ""), file=sys.stderr)
    return out


@hydra.main(config_path=CONF_DIR, config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_app(make_report, cfg)


if __name__ == "__main__":
    main()
