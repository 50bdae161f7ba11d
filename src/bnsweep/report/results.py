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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from bnsweep.config import compose
from bnsweep.stats import ALPHA, Interval, Test, censored_pairs, holm, superiority
from bnsweep.sweep import table
from bnsweep.sweep.basin import Basin, basin_diff, study_basin
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
# Per-trial quantities the claims need that no trial logs as such (see TrialResult.value)
DERIVED = {"train_test_gap": "train acc (eval mode, fixed training subset) minus test acc",
           "precise_bn_gain": "test acc with population statistics minus with running averages",
           "saturation": "fraction of the activation's inputs where its slope is below 10% of its peak, mean over "
                         "hidden layers, last half of training",
           "drift": "shift of the hidden Linear outputs' distribution (|Δ median| + |Δ 15-85 spread|) from the "
                    "first to the last sample, in units of the first sample's spread, mean over layers 2+"}


# ---------------------------------------------------------------------- what a sweep holds


@dataclass
class TrialResult:
    number: int
    lr: float
    state: str  # complete | pruned | diverged | failed | running | waiting
    metrics: dict[str, float]
    run_id: str | None
    repeat: int | None = None  # k of a repeat (seed + k at the best LR); None for an LR-search trial
    seed: int | None = None  # the training seed: what paired comparisons pair on
    population: int = 1  # trained as one of K stacked members (s/epoch is its share): compare time at equal K
    val_acc: list[float] = field(default_factory=list)  # per validation; fetched for best trials and repeats
    val_epoch: list[float] = field(default_factory=list)  # the (fractional) epoch of each val_acc, when logged
    diagnostics: list[dict[str, Any]] | None = None  # repeats: diagnostics.csv rows, when the sweep logged them

    @classmethod
    def of(cls, t: FrozenTrial) -> TrialResult:
        state = "diverged" if t.user_attrs.get("diverged") else t.state.name.lower().replace("fail", "failed")
        return cls(t.number, float(t.params.get(LR, math.nan)), state, dict(t.user_attrs.get("metrics") or {}),
                   (t.user_attrs.get("run") or {}).get("mlflow_run_id"), t.user_attrs.get("repeat"),
                   t.user_attrs.get("seed"), int(t.user_attrs.get("population", 1)))

    def value(self, key: str) -> float:
        if key == "time_to_target":  # of a censored run (converged 0): only a bound; report.results.compare knows
            return self.metrics.get("epochs_to_converge", math.nan) * self.metrics.get("s_per_epoch", math.nan)
        if key == "train_test_gap":  # eval-mode accuracy on a fixed training subset: no batch noise in it
            return self.metrics.get("train_acc_eval", math.nan) - self.metrics.get("test_acc", math.nan)
        if key in POINT_MEASURES:
            return point_measure(self.diagnostics or [], key)
        return float(self.metrics.get(key, math.nan))

    @property
    def epochs(self) -> list[float]:
        """x of the learning curve: ``val_epoch`` where logged alongside val_acc, else 1, 2, ..."""
        if len(self.val_epoch) == len(self.val_acc):
            return self.val_epoch
        return [float(i + 1) for i in range(len(self.val_acc))]


# measure -> (diagnostics point, first hidden layer it is taken from); see training/diagnostics.py
POINT_MEASURES = {"saturation": ("act_in", 1), "drift": ("linear_out", 2)}


def layer_index(layer: str) -> int:
    """The number in a layer's name (fc2 -> 2, a residual block's res2.fc2 -> 2; out -> 0): hidden layers in order."""
    return int("".join(ch for ch in layer.rsplit(".", 1)[-1] if ch.isdigit()) or 0)


def point_measure(rows: Sequence[dict[str, Any]], key: str) -> float:
    """``saturation`` or ``drift`` (see DERIVED) from diagnostics.csv rows; NaN where the point was not sampled."""
    point, first_layer = POINT_MEASURES[key]
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        layer = str(r["layer"])
        if r.get("point", "act_in") == point and layer_index(layer) >= first_layer and all(
                math.isfinite(float(r[k])) for k in ("p15", "p50", "p85")):
            by_layer.setdefault(layer, []).append(r)
    values = []
    for samples in by_layer.values():
        samples.sort(key=lambda r: r["step"])
        if key == "saturation":
            late = [float(r.get("sat", math.nan)) for r in samples[len(samples) // 2:]]
            late = [v for v in late if math.isfinite(v)]
            if late:
                values.append(sum(late) / len(late))
        else:
            first, last = samples[0], samples[-1]
            spread0, spread1 = first["p85"] - first["p15"], last["p85"] - last["p15"]
            if spread0 > 0:
                values.append((abs(last["p50"] - first["p50"]) + abs(spread1 - spread0)) / spread0)
    return sum(values) / len(values) if values else math.nan


@dataclass
class CellResult:
    name: str
    labels: dict[str, str]  # short grid key -> value label, in grid order
    row: dict[str, Any]  # table.cell_row: the LR search's answer
    trials: list[TrialResult]  # the LR search
    repeats: list[TrialResult]  # finished repeats at the best LR
    best: TrialResult | None
    basin: Basin
    diagnostics: list[dict[str, Any]] | None = None
    waiting: int = 0  # trials (LR search or repeats) not finished yet
    overrides: list[str] = field(default_factory=list)  # the cell's train-config overrides, as the study stores them
    resolution: float = 0.0  # the basin search's lattice step in decades (0: no basin search)

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
    basin = study_basin(study, search_range, target)
    return CellResult(study.user_attrs.get("cell", study.study_name), labels, table.cell_row(study, target),
                      search, repeats, next((t for t in search if best and t.number == best.number), None), basin,
                      waiting=sum(not t.state.is_finished() for t in trials),
                      overrides=list(study.user_attrs.get("overrides") or []),
                      resolution=float((study.user_attrs.get("basin") or {}).get("resolution", 0.0)))


def fetch_mlflow(client: MlflowClient, cells: Sequence[CellResult],
                 diagnostics_of: Callable[[CellResult, TrialResult], bool] | None = None) -> None:
    """val_acc histories of each best trial and repeat, the best trial's diagnostics and, for the claims'
    saturation and drift, the diagnostics of every trial ``diagnostics_of`` picks (default: the repeats);
    in parallel."""
    jobs: list[Callable[[], None]] = []
    pick = diagnostics_of or (lambda c, t: t.repeat is not None)

    def history(t: TrialResult) -> None:
        acc = sorted(client.get_metric_history(t.run_id, "val_acc"), key=lambda m: m.step)
        t.val_acc = [m.value for m in acc]
        epochs = {m.step: m.value for m in client.get_metric_history(t.run_id, "val_epoch")}
        t.val_epoch = [epochs[m.step] for m in acc if m.step in epochs]  # same step = global step

    def download(run_id: str) -> list[dict[str, Any]] | None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run_id, DIAGNOSTICS, tmp)
            except Exception:  # diagnostics were off for this sweep: no such artifact
                return None
            return read_csv(Path(path).read_text())

    def trial_diag(t: TrialResult) -> None:
        t.diagnostics = download(t.run_id)

    def cell_diag(c: CellResult, run_id: str) -> None:
        c.diagnostics = download(run_id)

    for c in cells:
        for t in [c.best, *c.repeats]:
            if t and t.run_id:
                jobs.append(lambda t=t: history(t))
        if c.best and c.best.run_id:
            jobs.append(lambda c=c: cell_diag(c, c.best.run_id))
        jobs += [lambda t=t: trial_diag(t) for t in [*c.trials, *c.repeats]
                 if t.run_id and t.state == "complete" and pick(c, t)]
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
        bn = [short[k] for k in grid_keys
              if k in ("model.bn", "model.norm") or k.startswith(("model.bn.", "model.norm."))]
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


CENSORED = ("epochs_to_converge", "time_to_target")  # unknown (censored) for a run that never reached the target
TIMED = ("s_per_epoch", "time_to_target")  # a population member's time is its share of K stacked networks


def _censored(c: CellResult, key: str) -> dict[int, tuple[float, bool]]:
    return {t.repeat: (v, bool(t.metrics.get("converged"))) for t in c.repeats
            if math.isfinite(v := t.value(key)) and t.metrics.get("converged") is not None}


def compare(a: CellResult, b: CellResult, key: str) -> Test:
    """Cell a minus cell b in one metric: the test that fits it (stats.py), paired by seed.

    Accuracies and s/epoch: a paired t-test over the repeats. Epochs and time to target: censored where a run
    never got there, so a paired sign test on the orderings (never budget + 1 averaged). LR basin: the widths
    of the search seeds that closed both edges, an exact sign-flip test on the lattice (at least one step
    wide); a basin from one seed, or an open edge, decides nothing.
    """
    if key == "basin":
        common = sorted(set(a.basin.closed) & set(b.basin.closed))
        diffs = [a.basin.closed[s].width - b.basin.closed[s].width for s in common]
        if len(diffs) < 2:  # one seed's bracket (or an open edge) is a bound, never a verdict
            iv = basin_diff(a.basin, b.basin)
            return Test(iv, 1.0, 1.0, "bracket (fewer than 2 seeds closed both edges)")
        return superiority(diffs, +1, lattice=max(a.resolution, b.resolution) or 0.25)
    ka, kb = _population(a), _population(b)

    def comparable(k: int) -> bool:  # time: only pairs trained at the same population size
        return key not in TIMED or ka.get(k) == kb.get(k)
    if key in CENSORED:
        ca, cb = _censored(a, key), _censored(b, key)
        common = sorted(k for k in set(ca) & set(cb) if comparable(k))
        return censored_pairs([ca[k] for k in common], [cb[k] for k in common], +1)
    va, vb = a.repeat_values(key), b.repeat_values(key)
    pairs = [k for k in va if k in vb and comparable(k)]
    test = superiority([va[k] - vb[k] for k in pairs], +1)
    dropped = sum(k in vb for k in va) - len(pairs)
    if dropped:
        test = replace(test, note=f"{dropped} pair(s) left out: trained at different population sizes")
    return test


def _population(c: CellResult) -> dict[int, int]:
    return {t.repeat: t.population for t in c.repeats}


@dataclass
class Comparison:
    """Cell a minus cell b (same group), paired by seed: a test per metric, decided after Holm (``decide``)."""

    group: str
    a: CellResult
    b: CellResult
    a_label: str
    b_label: str
    tests: dict[str, Test]
    verdicts: dict[str, str] = field(default_factory=dict)  # metric -> greater | less | not_resolved
    p_adjusted: dict[str, float] = field(default_factory=dict)

    @property
    def deltas(self) -> dict[str, Interval]:
        return {k: t.iv for k, t in self.tests.items()}

    @classmethod
    def of(cls, group: str, a: CellResult, b: CellResult, row: str) -> Comparison:
        return cls(group, a, b, a.labels[row], b.labels[row], {k: compare(a, b, k) for k, *_ in METRICS})


def decide_all(comps: Sequence[Comparison], alpha: float = ALPHA) -> None:
    """Holm's correction over every comparison line of one metric; a line's verdict is its sign where the
    corrected p < alpha. ``p_for`` of each test is 'a > b' (two-sided p on that side)."""
    for key, *_ in METRICS:
        tests = [c.tests[key] for c in comps]
        for c, t, p in zip(comps, tests, holm([t.p for t in tests]), strict=True):
            c.p_adjusted[key] = p
            c.verdicts[key] = ("not_resolved" if t.iv.n < 2 or not p < alpha else
                               "greater" if t.p_for <= t.p_against else "less")


def comparisons(cells: Sequence[CellResult], layout: Layout) -> tuple[list[Comparison], list[Comparison]]:
    """Per group: every BN variant vs the baseline, and the BN variants against each other; where the batch size
    is a grid factor beside them, also each batch size vs the reference one, per row value (``across``)."""
    vs_base: list[Comparison] = []
    between: list[Comparison] = []
    for g in layout.groups:
        by_row = {c.labels[layout.row]: c for c in cells if layout.group(c) == g}
        base = by_row.get(layout.baseline)
        variants = [r for r in layout.rows if r in by_row and r != layout.baseline]
        if base:
            vs_base += [Comparison.of(g, by_row[v], base, layout.row) for v in variants]
        between += [Comparison.of(g, by_row[a], by_row[b], layout.row)
                    for i, a in enumerate(variants) for b in variants[i + 1:]]
    between += across(cells, layout)
    decide_all([*vs_base, *between])
    return vs_base, between


ACROSS = "batch_size"  # a grid factor whose cells are also compared across its values (issue #19)


def across(cells: Sequence[CellResult], layout: Layout) -> list[Comparison]:
    """Each batch size vs the reference one (the gridded size nearest ``optimizer.reference_batch``, in log scale,
    the smaller on a tie), within each value of the row key and of the other keys: how a kind fares as the batch
    shrinks."""
    key = next((k for k in layout.keys if k != layout.row and k.rsplit(".", 1)[-1] == ACROSS), None)
    if key is None:
        return []
    sizes = layout.values[key]
    ref_batch = float(compose("train", cells[0].overrides).optimizer.get("reference_batch") or 32)
    ref = min(sizes, key=lambda s: (abs(math.log(float(s) / ref_batch)), float(s)))
    out = []
    for c in cells:
        if c.labels[key] == ref:
            continue
        within = {k: v for k, v in c.labels.items() if k != key}
        b = next((o for o in cells if o.labels[key] == ref
                  and {k: v for k, v in o.labels.items() if k != key} == within), None)
        if b is not None:
            group = ", ".join(f"{k}={v}" for k, v in within.items())
            out.append(Comparison(group, c, b, f"{key}={c.labels[key]}", f"{key}={ref}",
                                  {m: compare(c, b, m) for m, *_ in METRICS}))
    return out
