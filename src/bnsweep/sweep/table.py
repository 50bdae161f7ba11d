"""The per-cell answer of a sweep: best LR, accuracy, epochs to target, cost per epoch, LR basin."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from bnsweep.sweep.basin import LR_KEY, Bracket, basin_points, bracket, lr_basin_decades, measured, trial_points
from bnsweep.sweep.search import SEED_INDEX
from bnsweep.sweep.slots import basin_search, best_trial, counts, is_repeat

BASIN_COLUMNS = ["basin_width", "basin_width_lo", "basin_width_hi", "basin_lower_lo", "basin_lower_hi",
                 "basin_upper_lo", "basin_upper_hi", "basin_lower_open", "basin_upper_open", "basin_edge_resolution"]
COLUMNS = ["cell", "best_lr", "best_val_acc", "test_acc", "epochs_to_converge", "median_epochs_to_converge",
           "precise_bn_gain", "s_per_epoch", "lr_basin_decades", *BASIN_COLUMNS, "complete", "pruned", "diverged",
           "failed", "skipped", "running"]


def cell_bracket(study: optuna.Study, target_acc: float, trials: list | None = None) -> Bracket | None:
    """The basin's bracket of the cell's first seed (``basin.seeds`` > 1: the others are for the report's CI).

    Limits: the bracketing search's hard limits, else the searched LR range.
    """
    trials = [t for t in (study.get_trials(deepcopy=False) if trials is None else trials)
              if not is_repeat(t) and int(t.user_attrs.get(SEED_INDEX, 0)) == 0]
    search = basin_search(study)
    if search is not None:
        low, high = search.low, search.high
    else:
        dist = study.user_attrs.get("search", {}).get(LR_KEY)
        dist = optuna.distributions.json_to_distribution(dist) if dist else None
        low, high = (dist.low, dist.high) if dist is not None else (0.0, math.inf)
    return bracket(trial_points(trials, target_acc), low, high)


def bracket_row(br: Bracket | None) -> dict[str, float]:
    """The bracket as table metrics: an open edge's far bound and the width's upper bound are NaN (unknown)."""
    if br is None:
        return {}
    return {"basin_width": br.width, "basin_width_lo": br.width_lo,
            "basin_width_hi": br.width_hi if br.closed else math.nan,
            "basin_lower_lo": math.nan if br.lower_open else br.lower_lo, "basin_lower_hi": br.lower_hi,
            "basin_upper_lo": br.upper_lo, "basin_upper_hi": math.nan if br.upper_open else br.upper_hi,
            "basin_lower_open": float(br.lower_open), "basin_upper_open": float(br.upper_open),
            "basin_edge_resolution": br.edge_resolution() if br.closed else math.nan}
# The answers among them, as the sweep's runs table on the dashboard shows them first. MLflow orders metric
# columns by name and renders those in view, so keep this short: the basin's bounds and flags are a scroll away.
METRIC_COLUMNS = ["basin_width", "best_lr", "best_val_acc", "epochs_to_converge", "s_per_epoch", "test_acc"]


def cell_row(study: optuna.Study, target_acc: float) -> dict[str, Any]:
    """Summarize one cell's LR search (complete trials for 'best'; pruned ones count for the basin).

    Repeats (extra seeds at the best LR, see slots.top_up) only count in 'left'; the report uses them.
    """
    every = study.get_trials(deepcopy=False)
    trials = [t for t in every if not is_repeat(t)]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    c, left = counts(study, trials), counts(study, every)
    row: dict[str, Any] = {"cell": study.user_attrs.get("cell", study.study_name),
                           "complete": c["complete"], "pruned": c["pruned"], "diverged": c["diverged"],
                           "failed": c["fail"], "skipped": c["skipped"], "running": left["running"] + left["waiting"]}
    if done:
        best = best_trial(trials)
        m = best.user_attrs.get("metrics", {})
        row |= {"best_lr": best.params.get(LR_KEY, math.nan), "best_val_acc": best.value,
                "test_acc": m.get("test_acc", math.nan), "precise_bn_gain": m.get("precise_bn_gain", math.nan),
                "epochs_to_converge": m.get("epochs_to_converge", math.nan),
                "median_epochs_to_converge": statistics.median(
                    t.user_attrs["metrics"]["epochs_to_converge"] for t in done if "metrics" in t.user_attrs)}
    spe = [t.user_attrs["metrics"]["s_per_epoch"] for t in measured(trials) if "s_per_epoch" in t.user_attrs["metrics"]]
    row["s_per_epoch"] = statistics.median(spe) if spe else math.nan
    row["lr_basin_decades"] = lr_basin_decades(*basin_points(trials), target_acc)
    row |= bracket_row(cell_bracket(study, target_acc, trials))
    return {k: row.get(k, math.nan) for k in COLUMNS}


def format_cell(v: Any, key: str) -> str:
    """A table value as the Markdown table and the report show it: '-' for NaN, a format per column."""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if key.endswith("_open"):
            return "open" if v else "closed"
        if key == "best_lr" or key.startswith(("basin_lower", "basin_upper")) and not key.endswith("open"):
            return f"{v:.3g}"
        if key in ("epochs_to_converge", "median_epochs_to_converge"):
            return f"{v:g}"
        if key == "precise_bn_gain":
            return f"{v:+.4f}"
        return f"{v:.4f}" if "acc" in key else f"{v:.2f}"
    return str(v)


HEADERS = {"cell": "cell", "best_lr": "best lr", "best_val_acc": "val acc", "test_acc": "test acc",
           "precise_bn_gain": "precise BN - running",
           "epochs_to_converge": "epochs to target", "median_epochs_to_converge": "median epochs",
           "s_per_epoch": "s/epoch", "lr_basin_decades": "LR basin (decades)", "complete": "done",
           "pruned": "pruned", "diverged": "diverged", "failed": "failed", "skipped": "skipped", "running": "left",
           "basin_width": "basin width (dec)", "basin_width_lo": "width >=", "basin_width_hi": "width <=",
           "basin_lower_lo": "lower edge >", "basin_lower_hi": "lower edge <=", "basin_upper_lo": "upper edge >=",
           "basin_upper_hi": "upper edge <", "basin_lower_open": "lower open", "basin_upper_open": "upper open",
           "basin_edge_resolution": "edge res (dec)"}


def formatted(rows: Iterable[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The table's headers and its rows (``cell_row`` dicts) as text, column by column (``format_cell``)."""
    return [HEADERS[c] for c in COLUMNS], [[format_cell(r[c], c) for c in COLUMNS] for r in rows]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    """A Markdown table (no trailing newline); columns from ``numeric_from`` on are right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i >= numeric_from else "---" for i in range(len(headers))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def to_markdown(rows: Sequence[dict[str, Any]], target_acc: float) -> str:
    note = (f"\nepochs to target: epochs (samples seen / training images) at the first validation check with "
            f"val acc >= {target_acc:g} at the best LR (budget + 1 = never); LR basin: decades of LR that reached "
            "the target; '-': no trial got there; basin width: decades between the two edges' brackets (an open "
            "edge, flagged: the basin reaches the search's limit there, so the width is only a lower bound); "
            "precise BN - running: "
            "test acc with population statistics recomputed on the training set minus test acc with BN's "
            "running averages, at the best LR.")
    return markdown_table(*formatted(rows)) + "\n" + note + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
