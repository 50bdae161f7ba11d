"""The report's words: a sentence per comparison, stating a conclusion only where its interval excludes 0.

``compose`` turns collected cells, comparisons and figures into a ``Document`` (report.md and .html).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bnsweep.report.basins import EDGE_OPEN
from bnsweep.report.render import Document
from bnsweep.report.results import LR, METRICS, CellResult, Comparison, Layout
from bnsweep.report.stats import Interval, format_interval, mean_ci
from bnsweep.sweep import table

# ---------------------------------------------------------------------- sentences


# What each kind of comparison line states: BN variant vs baseline, and BN variants against each other
KEYS_VS_BASE = ("best_val_acc", "epochs_to_converge", "s_per_epoch", "time_to_target", "basin")
KEYS_BETWEEN = ("best_val_acc", "epochs_to_converge", "basin")


def resolvable(iv: Interval, fmt: str = "{:.4f}") -> str:
    """The power statement of an unresolved line: the half-width, below which differences stay unseen."""
    if not math.isfinite(iv.half_width):
        return ""
    if iv.half_width == 0:  # e.g. epochs to target equal on every seed: a measured zero, not a lack of power
        return f"; the difference is exactly {fmt.format(iv.estimate)} on every one of the {iv.n} seeds"
    by = "with this LR grid" if iv.kind == "bracket" else "with these seeds"
    return f"; differences smaller than ±{fmt.replace('+', '').format(iv.half_width)} cannot be told apart {by}"


def verdict(key: str, iv: Interval, a: str, b: str, target: float, fmt: str = "{:.4f}") -> str:
    """The conclusion the interval supports, or 'not resolved', why, and the smallest resolvable difference."""
    if iv.sign == 0:
        if iv.kind == EDGE_OPEN:
            return "not resolved: edge open (a basin edge lies at a search limit: its width is only a bound)"
        if key == "basin" and math.isnan(iv.estimate):
            return f"not resolved (no LR-search trial of one of the cells reached {target:g}: it has no basin)"
        if math.isnan(iv.estimate) or (iv.kind.endswith("CI") and iv.n < 2):
            return "not resolved (fewer than 2 paired seeds: the sweep has no repeats yet (sweep.repeats))"
        return f"not resolved (the {'bracket' if iv.kind == 'bracket' else 'CI'} includes 0{resolvable(iv, fmt)})"
    up = iv.sign > 0
    return {
        "best_val_acc": f"{a} is {'more' if up else 'less'} accurate than {b}",
        "test_acc": f"{a} is {'more' if up else 'less'} accurate on test than {b}",
        "epochs_to_converge": f"{a} reaches {target:g} in {'more' if up else 'fewer'} epochs than {b}",
        "s_per_epoch": f"{a} is {'slower' if up else 'faster'} per epoch than {b}",
        "time_to_target": f"{a} reaches {target:g} {'later' if up else 'sooner'} in wall time than {b}",
        "basin": f"{a} has a {'wider' if up else 'narrower'} LR basin than {b}",
    }[key]


def never_converged(comp: Comparison) -> bool:
    return not any(t.metrics.get("converged") for t in [*comp.a.repeats, *comp.b.repeats])


def line_verdict(comp: Comparison, key: str, target: float) -> tuple[str, str]:
    """(greater | less | not_resolved, the words) of one comparison line: what report.md and answers.csv say."""
    iv = comp.deltas[key]
    fmt = next(f for k, _, f in METRICS if k == key)
    if key in ("epochs_to_converge", "time_to_target") and never_converged(comp) and iv.n:
        return "not_resolved", f"not resolved (no repeat of either cell reached {target:g} within the budget)"
    return iv.verdict, verdict(key, iv, comp.a_label, comp.b_label, target, fmt)


def sentences(comp: Comparison, target: float, keys: Sequence[str]) -> list[str]:
    out = []
    for key, label, fmt in METRICS:
        if key in keys:
            iv = comp.deltas[key]
            say = line_verdict(comp, key, target)[1]
            text = format_interval(iv, fmt, "{est} [{low}, {high}] ({what})", "{est} (n={n}, no interval)")
            out.append(f"{label}: {text} → **{say}**")
    e, t = comp.deltas["epochs_to_converge"].sign, comp.deltas["time_to_target"].sign
    if e < 0 and t >= 0:
        out.append(f"*{comp.a_label} is faster in epochs, not in time* (seed 001's observation)")
    return out


# ---------------------------------------------------------------------- the document


def _num(v: float, fmt: str = "{:.4f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def search_line(attrs: dict[str, Any], lo: float, hi: float) -> str:
    """How the cell's LR was searched, as the report's header says it."""
    basin = attrs.get("basin")
    if basin:
        seeds = int(basin.get("seeds", 1))
        return (f"an LR search that brackets both edges of the basin to {basin['resolution']:g} decade within "
                f"[{basin['low']:g}, {basin['high']:g}] for {seeds} seed{'s' * (seeds > 1)} "
                f"(at most {attrs['n_trials']} trials, full budget each)")
    return (f"{attrs['n_trials']} LR-search trials over `{LR}` ∈ [{lo:g}, {hi:g}] "
            f"(sampler {attrs['sampler'].get('name')})")


def compose(name: str, attrs: dict[str, Any], cells: Sequence[CellResult], layout: Layout,
            vs_base: Sequence[Comparison], between: Sequence[Comparison], figs: dict[str, Path],
            notes: dict[str, str], link: str) -> Document:
    target, repeats = attrs["target_acc"], attrs.get("repeats", 0)
    doc = Document(f"BN study report: sweep `{name}`")
    left = sum(c.waiting for c in cells)
    lo, hi = attrs["search_range"]
    doc.para(f"{attrs.get('description') or ''}".strip() or f"Sweep `{name}`.")
    grid = ", ".join(f"`{k}` ∈ {{{', '.join(v)}}}" for k, v in layout.values.items())
    doc.bullets([
        f"grid: {grid} ({len(cells)} cells)",
        f"per cell: {search_line(attrs, lo, hi)}, {attrs['epochs']} epoch(s) each, target val acc {target:g}; "
        f"then {repeats} repeats (seeds +1..+{repeats}) at the cell's best LR",
        f"status: {'complete' if not left else f'**{left} trials not finished**: numbers may change'}; "
        f"generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"MLflow: {link}",
    ])

    doc.heading("Answers")
    doc.para(f"Each line compares two cells of the same group at their own best learning rates: a difference "
             f"(first minus second) with its 95% CI over {repeats} paired seeds, or, for the LR basin, its 95% CI "
             f"over the search's seeds (with one seed: the bracket the LR grid allows). A conclusion is stated only "
             f"where the interval excludes 0.")
    for g in layout.groups:
        comps = [c for c in vs_base if c.group == g]
        others = [c for c in between if c.group == g]
        if not comps and not others:
            continue
        doc.heading(f"{g}", 3)
        for comp in comps:
            doc.para(f"**{'Does BN help? ' if layout.bn else ''}{comp.a_label} vs {comp.b_label}**")
            doc.bullets(sentences(comp, target, KEYS_VS_BASE))
        for comp in others:
            doc.para(f"**{'Where should BN go? ' if layout.bn else ''}{comp.a_label} vs {comp.b_label}**")
            doc.bullets(sentences(comp, target, KEYS_BETWEEN))
    if not vs_base and not between:
        doc.para("The grid has a single value per key, so there is nothing to compare.")

    doc.heading("Repeats at each cell's best learning rate")
    doc.para(f"Mean and 95% CI (t-distribution) over the repeats; epochs to target counts a run that never got "
             f"there as budget + 1 ({attrs['epochs'] + 1}), so such means are lower bounds.")
    rows = []
    for c in cells:
        def ci(key: str, fmt: str, c: CellResult = c) -> str:
            return format_interval(mean_ci(list(c.repeat_values(key).values())), fmt)
        rows.append([c.name, _num(c.row["best_lr"], "{:.3g}"), str(len(c.repeats)), ci("best_val_acc", "{:.4f}"),
                     ci("test_acc", "{:.4f}"), ci("epochs_to_converge", "{:.2f}"), ci("s_per_epoch", "{:.3f}"),
                     ci("time_to_target", "{:.1f}"), c.basin.describe()])
    doc.table(["cell", "best lr", "n", "val acc", "test acc", "epochs to target", "s/epoch", "time to target (s)",
               "LR basin"], rows)

    doc.heading("All differences")
    diff_rows = [[f"{c.group}: {c.a_label} − {c.b_label}", *[format_interval(c.deltas[k], fmt)
                                                          for k, _, fmt in METRICS]]
                 for c in [*vs_base, *between]]
    if diff_rows:
        doc.table(["comparison", *[f"Δ {label}" for _, label, _ in METRICS]], diff_rows)

    doc.heading("Figures")
    captions = {
        "heatmap": "Best val accuracy and the test accuracy of that trial, per cell (LR search).",
        "effects": "Paired differences (first minus second cell) with 95% CIs; the LR basin with its bracket "
                   "(dotted). Blue: the interval excludes 0; gray: not resolved.",
        "lr_curves": f"LR-accuracy curves: best val acc of every LR-search trial (o complete, v pruned, x diverged),"
                     f" repeats as black dots, target {target:g} dashed, the LR basin shaded green.",
        "learning_curves": "Learning curves at each cell's best LR: val acc per epoch; thin: each repeat, "
                           "bold: their mean.",
        "epochs_time": "Epochs to target, seconds per epoch and time to target (their product): mean and 95% CI "
                       "of the repeats. BN often wins in epochs and loses part of it per epoch.",
        "importance": "Optuna parameter importance of the grid keys and the LR for best val acc, over all cells' "
                      "LR-search trials.",
        "slice": "Optuna slice plot: best val acc of every LR-search trial against each key.",
        "diag_preact": "Input of each hidden layer's activation (15th-85th percentile band, median line) over "
                       "training steps, at the best LR: the 'internal covariate shift' view. Sigmoid saturates "
                       "where |input| > ~4.",
        "diag_grad": "L2 norm of each layer's weight gradient over training steps (log scale): the "
                     "vanishing-gradient view.",
    }
    for key, path in figs.items():
        doc.figure(path, captions[key])
    for note in notes.values():
        doc.para(f"*{note}*")

    doc.heading("LR search per cell")
    doc.table(*table.formatted(c.row for c in cells))

    doc.heading("How these numbers are made")
    doc.bullets([
        "best LR: the LR-search trial with the highest best val acc (the first on ties); its own accuracy is the "
        "maximum of several trials, so it is optimistic. The repeats (fresh seeds, full budget, no pruning) "
        "give unbiased estimates at that LR.",
        "paired comparison: repeat k uses seed + k in every cell (same init stream and batch order), so "
        "differences are taken seed by seed and the t-interval is over those differences.",
        "LR basin: decades between its two edges, each bracketed by the last LR that reached the target and the "
        "next one tried that missed (or the search's limit: then that edge is open and the width only a lower "
        "bound, never compared). One LR-search seed: the width is that bracket; several seeds with closed "
        "brackets: the mean over seeds with a 95% CI, compared paired by seed.",
        "not resolved: the interval includes 0; its half-width is the smallest difference this data could have "
        "told apart. The same lines are in answers.csv, the basins in basins.csv.",
        "time to target: epochs to target x mean seconds per epoch of that run (workers run in parallel, so "
        "seconds are comparable within one sweep only).",
    ])
    return doc
