"""The report's words: a sentence per comparison, stating a conclusion only where its interval excludes 0.

``compose`` turns collected cells, comparisons and figures into a ``Document`` (report.md and .html).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bnsweep.report.render import Document
from bnsweep.report.results import LR, METRICS, CellResult, Comparison, Layout
from bnsweep.stats import Interval, Test, fit_digits, mean_ci
from bnsweep.sweep import table
from bnsweep.sweep.basin import EDGE_OPEN

# ---------------------------------------------------------------------- sentences


# What each kind of comparison line states: BN variant vs baseline, and BN variants against each other
KEYS_VS_BASE = ("best_val_acc", "epochs_to_converge", "s_per_epoch", "time_to_target", "basin")
KEYS_BETWEEN = ("best_val_acc", "epochs_to_converge", "basin")


SCALES = {"best_val_acc": (100.0, " pp"), "test_acc": (100.0, " pp"), "epochs_to_converge": (1.0, " epochs"),
          "s_per_epoch": (1.0, " s"), "time_to_target": (1.0, " s"), "basin": (1.0, " dec.")}


def resolvable(iv: Interval, key: str) -> str:
    """The power statement of an unresolved line: the half-width, below which differences stay unseen."""
    if not math.isfinite(iv.half_width):
        return ""
    scale, unit = SCALES[key]
    if iv.half_width == 0:  # e.g. a basin wider by one step on every seed: a measured value, but no spread
        return f"; the difference is {fit_digits(iv, scale, unit=unit)} seeds, too few for an exact test"
    return f"; differences smaller than ±{iv.half_width * scale:.2g}{unit} cannot be told apart with these seeds"


def verdict(key: str, test: Test, decided: str, a: str, b: str, target: float) -> str:
    """The conclusion the (Holm-corrected) test supports, or 'not resolved', why, and the resolvable difference."""
    iv = test.iv
    if decided == "not_resolved":
        if iv.kind == EDGE_OPEN:
            return "not resolved: edge open (a basin edge lies at a search limit: its width is only a bound)"
        if key == "basin" and math.isnan(iv.estimate):
            return f"not resolved (no LR-search trial of one of the cells reached {target:g}: it has no basin)"
        if key == "basin" and iv.n < 2:
            return "not resolved (fewer than 2 LR-search seeds closed both edges: a bracket is no verdict)"
        if math.isnan(iv.estimate) or iv.n < 2:
            return "not resolved (fewer than 2 paired seeds: the sweep has no repeats yet (sweep.repeats))"
        return f"not resolved (p = {test.p:.2g} before Holm's correction{resolvable(iv, key)})"
    up = decided == "greater"
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
    if key in ("epochs_to_converge", "time_to_target") and never_converged(comp) and comp.tests[key].iv.n == 0:
        return "not_resolved", f"not resolved (no repeat of either cell reached {target:g} within the budget)"
    decided = comp.verdicts.get(key, "not_resolved")
    return decided, verdict(key, comp.tests[key], decided, comp.a_label, comp.b_label, target)


def effect(comp: Comparison, key: str) -> str:
    """The difference with the digits its interval supports, the test and its corrected p."""
    t = comp.tests[key]
    scale, unit = SCALES[key]
    text = fit_digits(t.iv, scale, unit=unit)
    if text == "-":
        return text
    extra = f"; {t.note}" if t.note else ""
    p = comp.p_adjusted.get(key, math.nan)
    return f"{text}, n={t.iv.n} ({t.method}{extra}; Holm p = {p:.2g})"


def sentences(comp: Comparison, target: float, keys: Sequence[str]) -> list[str]:
    out = []
    for key, label, _ in METRICS:
        if key in keys:
            out.append(f"{label}: {effect(comp, key)} → **{line_verdict(comp, key, target)[1]}**")
    e, t = comp.verdicts.get("epochs_to_converge"), comp.verdicts.get("time_to_target")
    if e == "less" and t != "less":
        out.append(f"*{comp.a_label} is faster in epochs, not in time* (seed 001's observation)")
    return out


# ---------------------------------------------------------------------- the document


CAPTIONS = {
    "verdicts": "Verdict matrix: each comparison line (first minus second) by metric, after Holm's correction. "
                "Green: first is better (more accurate, fewer epochs, faster, wider basin); red: worse; gray: not "
                "resolved. 'better' reads each metric the way a researcher wants it.",
    "effects": "Paired differences (first minus second cell) with 95% CIs; the LR basin's over its seeds (a "
               "single seed's bracket dotted). Blue: resolved after Holm's correction; gray: not resolved.",
}


def captions_for(target: float) -> dict[str, str]:
    """The other figures' captions (those that name the target)."""
    return {
        "heatmap": "Best val accuracy and the test accuracy of that trial, per cell (LR search).",
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

    doc.heading("At a glance")
    doc.para("Where BN helps, hurts or is unresolved: every comparison line below (rows) by metric (columns), "
             "coloured by its verdict after Holm's correction (green: first is better, red: worse, gray: not "
             "resolved), then each difference with its 95% interval.")
    for key in ("verdicts", "effects"):
        if key in figs:
            doc.figure(figs[key], CAPTIONS[key])

    doc.heading("Answers")
    doc.para(f"Each line compares two cells of the same group at their own best learning rates, paired by seed "
             f"over {repeats} repeats: accuracies and s/epoch with a paired t-test; epochs and time to target, "
             f"censored for a run that never got there, with a paired sign test on the orderings censoring allows "
             f"(their interval is over the pairs where both got there); the LR basin over the search's seeds that "
             f"closed both edges, with an exact sign-flip test (it lies on a lattice; one seed decides nothing). "
             f"A conclusion is stated only where the p-value, Holm-corrected over every line of the same metric, "
             f"is below 0.05.")
    for g in dict.fromkeys([*layout.groups, *(c.group for c in between)]):  # then across batch sizes, if any
        comps = [c for c in vs_base if c.group == g]
        others = [c for c in between if c.group == g]
        if not comps and not others:
            continue
        doc.heading(f"{g}", 3)
        for comp in comps:
            doc.para(f"**{'Does BN help? ' if layout.bn else ''}{comp.a_label} vs {comp.b_label}**")
            doc.bullets(sentences(comp, target, KEYS_VS_BASE))
        for comp in others:
            across = comp.a_label not in layout.rows  # a batch size vs the reference one (results.across)
            doc.para(f"**{'Where should BN go? ' if layout.bn and not across else ''}{comp.a_label} vs "
                     f"{comp.b_label}**")
            doc.bullets(sentences(comp, target, KEYS_BETWEEN))
    if not vs_base and not between:
        doc.para("The grid has a single value per key, so there is nothing to compare.")

    doc.heading("Repeats at each cell's best learning rate")
    doc.para("Mean and 95% CI (t-distribution) over the repeats, with the digits the interval supports; epochs "
             "and time to target over the repeats that got there, with how many did (a run that never got there "
             "is censored, never averaged).")
    rows = []
    for c in cells:
        def ci(key: str, scale: float = 1.0, c: CellResult = c) -> str:
            return fit_digits(mean_ci(list(c.repeat_values(key).values())), scale, signed=False)

        def reached(key: str, c: CellResult = c) -> str:
            got = [t.value(key) for t in c.repeats if t.metrics.get("converged")]
            if not c.repeats:
                return "-"
            if not got:
                return "never"
            return f"{fit_digits(mean_ci(got), signed=False)} ({len(got)}/{len(c.repeats)})"
        rows.append([c.name, _num(c.row["best_lr"], "{:.3g}"), str(len(c.repeats)), ci("best_val_acc", 100),
                     ci("test_acc", 100), reached("epochs_to_converge"), ci("s_per_epoch"),
                     reached("time_to_target"), c.basin.describe()])
    doc.table(["cell", "best lr", "n", "val acc %", "test acc %", "epochs to target (reached)", "s/epoch",
               "time to target, s (reached)", "LR basin"], rows)

    doc.heading("All differences")
    diff_rows = [[f"{c.group}: {c.a_label} − {c.b_label}",
                  *[fit_digits(c.deltas[k], SCALES[k][0]) for k, _, _ in METRICS]] for c in [*vs_base, *between]]
    if diff_rows:
        doc.table(["comparison", *[f"Δ {label}{' (pp)' if SCALES[k][0] == 100 else ''}"
                                   for k, label, _ in METRICS]], diff_rows)

    doc.heading("Figures")
    captions = {**CAPTIONS, **captions_for(target)}
    for key, path in figs.items():
        if key not in ("verdicts", "effects"):  # shown at the top
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
