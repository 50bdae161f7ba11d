"""The per-cell answer of a sweep: best LR, test accuracy over the repeats, epochs to target, cost per epoch,
the LR basin over its seeds.

``cell_row`` gives every column (``COLUMNS``): summary.csv has them all, the cell's MLflow parent run gets
the numbers as metrics. ``formatted`` / ``to_markdown`` give the few the table printed at the end of
``bnsweep sweep`` shows (``TABLE``), each number with the digits its interval supports (``stats.fit_digits``).
The LR basin is ``basin.cell_basin``'s (what ``study_basin`` computes), over every basin seed, here as in the report.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from bnsweep.stats import Interval, decimals, fit_digits, mean_ci
from bnsweep.sweep.basin import LR_KEY, Basin, cell_basin, measured, search_limits
from bnsweep.sweep.definition import cell_labels
from bnsweep.sweep.slots import best_trial, counts, is_repeat
from bnsweep.tracking.names import cell_run_name

# The basin over its seeds (``Basin.width``: the mean with its 95% CI over the seeds that closed both edges,
# else the first seed's bracket), then the first seed's bracket: its edges, as LRs, and whether each is open.
BASIN_COLUMNS = ["basin_width", "basin_width_lo", "basin_width_hi", "basin_seeds", "basin_seeds_closed",
                 "basin_lower_lo", "basin_lower_hi", "basin_upper_lo", "basin_upper_hi", "basin_lower_open",
                 "basin_upper_open", "basin_edge_resolution"]
# The repeats at the best LR (fresh seeds, full budget): test accuracy with its 95% CI, epochs to target
# over those that reached it.
REPEAT_COLUMNS = ["repeats", "test_acc_mean", "test_acc_lo", "test_acc_hi", "repeats_reached", "epochs_mean",
                  "epochs_lo", "epochs_hi"]
COLUMNS = ["cell", "label", "best_lr", "best_val_acc", "test_acc", "best_converged", "epochs_to_converge",
           "median_epochs_to_converge", "precise_bn_gain", *REPEAT_COLUMNS, "s_per_epoch", *BASIN_COLUMNS, "done",
           "complete", "pruned", "diverged", "failed", "skipped", "running"]
# The answers among them, as the sweep's runs table on the dashboard shows them first: the same numbers as the
# printed table. MLflow orders metric columns by name and renders those in view, so keep this short.
METRIC_COLUMNS = ["basin_width", "best_lr", "best_val_acc", "epochs_mean", "s_per_epoch", "test_acc_mean"]


# ---------------------------------------------------------------------- the row


def converged(m: Mapping[str, float]) -> bool:
    """Whether a run reached the target: its ``converged`` metric (0: its epochs to target are censored)."""
    c = m.get("converged")
    return bool(c) if c is not None else math.isfinite(m.get("epochs_to_converge", math.nan))


def repeat_row(repeats: Iterable[FrozenTrial]) -> dict[str, float]:
    """The finished repeats (``measured``): test acc mean and 95% CI; epochs to target over those that got there."""
    ms = [t.user_attrs["metrics"] for t in measured(repeats)]
    if not ms:
        return {"repeats": 0}
    acc = mean_ci([m.get("test_acc", math.nan) for m in ms])
    reached = [m for m in ms if converged(m)]
    ep = mean_ci([m.get("epochs_to_converge", math.nan) for m in reached])
    return {"repeats": len(ms), "test_acc_mean": acc.estimate, "test_acc_lo": acc.low, "test_acc_hi": acc.high,
            "repeats_reached": len(reached), "epochs_mean": ep.estimate, "epochs_lo": ep.low, "epochs_hi": ep.high}


def basin_row(basin: Basin) -> dict[str, float]:
    """The basin as table metrics: its width over the seeds, then the first seed's bracket. An open edge's far
    bound and the width's upper bound where an edge is open are NaN (unknown)."""
    row = {"basin_seeds": len(basin.brackets), "basin_seeds_closed": len(basin.closed)}
    b, w = basin.main, basin.width
    if b is None:
        return row
    row |= {"basin_width": w.estimate, "basin_width_lo": w.low,
            "basin_width_hi": w.high if math.isfinite(w.high) else math.nan,
            "basin_lower_lo": math.nan if b.lower_open else b.lower_lo, "basin_lower_hi": b.lower_hi,
            "basin_upper_lo": b.upper_lo, "basin_upper_hi": math.nan if b.upper_open else b.upper_hi,
            "basin_lower_open": float(b.lower_open), "basin_upper_open": float(b.upper_open),
            "basin_edge_resolution": b.edge_resolution() if b.closed else math.nan}
    return row


def cell_label(study: optuna.Study) -> str:
    """The cell's grid values, as its MLflow parent run is named ('before_act · relu')."""
    grid = study.user_attrs.get("grid")
    return cell_run_name(cell_labels(grid).values()) if grid else study.user_attrs.get("cell", study.study_name)


def cell_row(study: optuna.Study, target_acc: float) -> dict[str, Any]:
    """Summarize one cell: its LR search (complete trials for 'best'; pruned ones count for the basin), the
    repeats at its best LR, and its trial counts (``complete`` .. ``skipped``: the LR search; ``done``
    (trained and finished) and ``running`` (still to run): every trial, repeats included)."""
    every = study.get_trials(deepcopy=False)
    trials = [t for t in every if not is_repeat(t)]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    c, left = counts(study, trials), counts(study, every)
    row: dict[str, Any] = {"cell": study.user_attrs.get("cell", study.study_name), "label": cell_label(study),
                           "complete": c["complete"], "pruned": c["pruned"], "diverged": c["diverged"],
                           "failed": c["fail"], "skipped": c["skipped"],
                           "done": sum(left[k] for k in ("complete", "pruned", "diverged", "fail")),
                           "running": left["running"] + left["waiting"]}
    if done:
        best = best_trial(trials)
        m = best.user_attrs.get("metrics", {})
        row |= {"best_lr": best.params.get(LR_KEY, math.nan), "best_val_acc": best.value,
                "test_acc": m.get("test_acc", math.nan), "precise_bn_gain": m.get("precise_bn_gain", math.nan),
                "epochs_to_converge": m.get("epochs_to_converge", math.nan), "best_converged": float(converged(m)),
                "median_epochs_to_converge": statistics.median(
                    t.user_attrs["metrics"]["epochs_to_converge"] for t in done if "metrics" in t.user_attrs)}
    row |= repeat_row(t for t in every if is_repeat(t))
    spe = [t.user_attrs["metrics"]["s_per_epoch"] for t in measured(trials) if "s_per_epoch" in t.user_attrs["metrics"]]
    row["s_per_epoch"] = statistics.median(spe) if spe else math.nan
    low, high = search_limits(study.user_attrs)
    if low < high:  # a search over one fixed rate has no basin to bracket
        row |= basin_row(cell_basin(every, low, high, target_acc))  # the trials read above, not read again
    return {k: row.get(k, math.nan) for k in COLUMNS}


# ---------------------------------------------------------------------- the printed table


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def _sig(v: float, digits: int) -> str:
    """At most ``digits`` significant digits (0.0316, 0.1, 12); '-' for NaN."""
    return f"{v:.{digits}g}" if math.isfinite(v) else "-"


def _fit(iv: Interval, scale: float = 1.0) -> str:
    """``stats.fit_digits`` (unsigned), a half-width of float noise (the same value n times) taken as 0."""
    if iv.half_width <= 1e-9 * max(1.0, abs(iv.estimate)):
        iv = Interval(iv.estimate, iv.estimate, iv.estimate, iv.n, iv.kind)
    return fit_digits(iv, scale=scale, signed=False)


def _short(v: float) -> str:
    """A width bound: two decimals at most, no trailing zeros (2.25, 2.5, 3)."""
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _count(v: Any) -> str:
    return str(int(v)) if math.isfinite(_num(v)) else "-"


def show_cell(r: Mapping[str, Any]) -> str:
    label = r.get("label")
    return label if isinstance(label, str) and label else str(r["cell"])


def show_test_acc(r: Mapping[str, Any]) -> str:
    """Mean [95% CI] over the repeats, in %; one repeat: its value ('(1 run)'); none yet: the LR search's best
    trial's ('(search)')."""
    n = _num(r.get("repeats"))
    if n >= 1 and math.isfinite(_num(r.get("test_acc_mean"))):
        # an accuracy lies in [0, 1]: a t-interval of few repeats may reach past it, the table does not
        lo, hi = _num(r.get("test_acc_lo")), _num(r.get("test_acc_hi"))
        iv = Interval(_num(r["test_acc_mean"]), lo if math.isnan(lo) else max(0.0, lo),
                      hi if math.isnan(hi) else min(1.0, hi), int(n))
        return _fit(iv, 100.0) if math.isfinite(lo) else f"{100 * iv.estimate:.1f} (1 run)"
    v = _num(r.get("test_acc"))
    return f"{100 * v:.1f} (search)" if math.isfinite(v) else "-"


def show_epochs(r: Mapping[str, Any]) -> str:
    """Mean epochs to target over the repeats that reached it ('k/n reached' when not all did; never: none
    did); without repeats the LR search's best trial's."""
    n = _num(r.get("repeats"))
    if n >= 1:
        k = _num(r.get("repeats_reached"))
        mean = _num(r.get("epochs_mean"))
        if not k or not math.isfinite(mean):
            return "never"
        hw = (_num(r.get("epochs_hi")) - _num(r.get("epochs_lo"))) / 2
        # digits that fit the CI; no CI (one run) or none needed (the same value each time): as it is
        text = f"{mean:.{decimals(hw)}f}" if math.isfinite(hw) and hw > 1e-9 * max(1.0, mean) else f"{mean:.3g}"
        return text if k >= n else f"{text} ({int(k)}/{int(n)} reached)"
    reached, epochs = _num(r.get("best_converged")), _num(r.get("epochs_to_converge"))
    if math.isnan(reached) or math.isnan(epochs):
        return "-"
    return f"{epochs:.3g}" if reached else "never"


def show_basin(r: Mapping[str, Any]) -> str:
    """'1.50 [1.25, 1.75]' (mean and CI over seeds; one seed: its bracket), '≥ 2.4, upper edge open',
    'no LR reached'; '(k/n seeds)' where only k of the n seeds closed both edges."""
    seeds, closed = _num(r.get("basin_seeds")), _num(r.get("basin_seeds_closed"))
    w = _num(r.get("basin_width"))
    if not seeds or math.isnan(seeds):
        return "-"
    if math.isnan(w):
        return "no LR reached"
    suffix = f" ({int(closed)}/{int(seeds)} seeds)" if seeds >= 2 and closed < seeds else ""
    over_seeds = seeds >= 2 and closed >= 2
    lower, upper = _num(r.get("basin_lower_open")) == 1, _num(r.get("basin_upper_open")) == 1
    if not over_seeds and (lower or upper):
        which = "both edges" if lower and upper else "lower edge" if lower else "upper edge"
        return f"≥ {_short(_num(r['basin_width_lo']))}, {which} open"
    iv = Interval(w, _num(r.get("basin_width_lo")), _num(r.get("basin_width_hi")), int(closed) or 1)
    return _fit(iv) + suffix


def show_done(r: Mapping[str, Any]) -> str:
    return f"{_count(r.get('done'))}/{_count(r.get('running'))}"


# pseudo-column -> (header, its text from a row); at most 8 columns, to fit a 100-column terminal
TABLE: dict[str, tuple[str, Callable[[Mapping[str, Any]], str]]] = {
    "cell": ("cell", show_cell),
    "best_lr": ("best LR", lambda r: _sig(_num(r.get("best_lr")), 3)),
    "test_acc": ("test acc %", show_test_acc),
    "epochs": ("epochs", show_epochs),
    "s_per_epoch": ("s/epoch", lambda r: _sig(_num(r.get("s_per_epoch")), 2)),
    "basin": ("LR basin (dec.)", show_basin),
    "done": ("done/left", show_done),
}


def formatted(rows: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The table's headers and its rows (``cell_row`` dicts) as text, column by column (``TABLE``)."""
    return [h for h, _ in TABLE.values()], [[show(r) for _, show in TABLE.values()] for r in rows]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1,
                   align: bool = False) -> str:
    """A Markdown table (no trailing newline); columns from ``numeric_from`` on are right-aligned.

    ``align``: pad every column to its widest cell, so the table reads as a table in a terminal too.
    """
    rows = [list(r) for r in rows]
    widths = [max([3, len(h), *(len(r[i]) for r in rows)]) if align else 0 for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i >= numeric_from else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    if align:
        rule = "|" + "|".join("-" * (w + 1) + ":" if i >= numeric_from else "-" * (w + 2)
                              for i, w in enumerate(widths)) + "|"
    else:
        rule = "|" + "|".join("---:" if i >= numeric_from else "---" for i in range(len(headers))) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def to_markdown(rows: Sequence[Mapping[str, Any]], target_acc: float) -> str:
    note = (f"test acc %: mean [95% CI] over the repeats at the best LR (fresh seeds); '(search)': no repeat "
            "has finished, test acc and epochs are the LR search's best trial's. epochs: mean epochs to val acc "
            f">= {target_acc:g} over the repeats that got there ('k/n reached': only k did; never: none did). "
            "s/epoch: median over the "
            "LR search. LR basin: decades of LR whose LR-search trials reached the target, mean [95% CI] over "
            "the seeds that bracketed both edges (one seed: its bracket; '(k/n seeds)': only k of n did); "
            "'≥ w, upper edge open': the basin reaches the search's limit there, so w is a lower bound. "
            "done/left: trials finished / still to run. Every other column (edges, counts, precise BN): "
            "summary.csv.")
    return markdown_table(*formatted(rows), align=True) + "\n\n" + textwrap.fill(note, 100) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
