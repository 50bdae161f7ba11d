"""What a sweep holds, as the report sees it: trials, cells, the layout of the grid, paired comparisons.

Read from the Optuna storage (``collect_cell``) and MLflow (``fetch_mlflow``); the sentences, figures and
the rendered report all work on these classes.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from bnsweep.report.stats import Interval, basin_bracket, bracket_diff, paired_diff
from bnsweep.sweep import table
from bnsweep.sweep.basin import basin_points
from bnsweep.sweep.definition import cell_labels, short_keys
from bnsweep.sweep.slots import best_trial, is_repeat
from bnsweep.training.diagnostics import ARTIFACT as DIAGNOSTICS
from bnsweep.training.diagnostics import read_csv

LR = table.LR_KEY
log = logging.getLogger("bnsweep.report")
# What two cells are compared in: metric key, label, number format of a difference
METRICS = [("best_val_acc", "best val acc", "{:+.4f}"), ("test_acc", "test acc", "{:+.4f}"),
           ("epochs_to_converge", "epochs to target", "{:+.2f}"), ("s_per_epoch", "s/epoch", "{:+.3f}"),
           ("time_to_target", "time to target (s)", "{:+.1f}"), ("basin", "LR basin (decades)", "{:+.2f}")]

# ---------------------------------------------------------------------- what a sweep holds


@dataclass
class TrialResult:
    number: int
    lr: float
    state: str  # complete | pruned | diverged | failed | running | waiting
    metrics: dict[str, float]
    run_id: str | None
    repeat: int | None = None  # k of a repeat (seed + k at the best LR); None for an LR-search trial
    val_acc: list[float] = field(default_factory=list)  # per check; fetched for best trials and repeats
    val_epoch: list[float] = field(default_factory=list)  # each check's fractional epoch (empty for old runs)

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
    row: dict[str, Any]  # table.cell_row: the LR search's answer
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


def collect_cell(study: optuna.Study, search_range: tuple[float, float], target: float) -> CellResult:
    trials = study.get_trials(deepcopy=False)
    labels = cell_labels(study.user_attrs.get("grid") or {}) or {"cell": study.user_attrs.get("cell", "all")}
    search = [TrialResult.of(t) for t in trials if not is_repeat(t)]
    repeats = [TrialResult.of(t) for t in trials if is_repeat(t) and t.state.is_finished() and t.user_attrs.get(
        "metrics")]
    best = best_trial(trials)
    basin = basin_bracket(*basin_points(t for t in trials if not is_repeat(t)), target, *search_range)
    return CellResult(study.user_attrs.get("cell", study.study_name), labels, table.cell_row(study, target),
                      search, repeats, next((t for t in search if best and t.number == best.number), None), basin,
                      waiting=sum(not t.state.is_finished() for t in trials))


def fetch_mlflow(client: MlflowClient, cells: Sequence[CellResult]) -> None:
    """val_acc histories of each best trial and repeat, and the best trial's diagnostics, in parallel."""
    jobs: list[Callable[[], None]] = []

    def history(t: TrialResult) -> None:
        t.val_acc = [m.value for m in sorted(client.get_metric_history(t.run_id, "val_acc"),
                                             key=lambda m: m.step)]
        t.val_epoch = [m.value for m in sorted(client.get_metric_history(t.run_id, "val_epoch"),
                                               key=lambda m: m.step)]

    def diag(c: CellResult, run_id: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run_id, DIAGNOSTICS, tmp)
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
        short = short_keys(list(grid_keys))
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
