"""The report's answers as CSV beside report.md: one row per comparison line, one row per cell's basin.

What a script (or a notebook comparing sweeps) reads instead of parsing sentences; the verdicts are the
report's own (``sentences.line_verdict``), so the two cannot disagree.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bnsweep.report.results import CellResult, Comparison
from bnsweep.report.sentences import KEYS_BETWEEN, KEYS_VS_BASE, line_verdict

ANSWER_COLUMNS = ["group", "first", "second", "metric", "diff", "lo", "hi", "n", "verdict"]
BASIN_COLUMNS = ["cell", "lower_lo", "lower_hi", "upper_lo", "upper_hi", "lower_open", "upper_open", "width",
                 "width_lo", "width_hi", "seeds"]


def answer_rows(vs_base: Sequence[Comparison], between: Sequence[Comparison], target: float) -> list[dict[str, Any]]:
    """The report's comparison lines, in its order: each variant vs the baseline, then variants pairwise."""
    rows = []
    for comps, keys in ((vs_base, KEYS_VS_BASE), (between, KEYS_BETWEEN)):
        for comp in comps:
            for key in keys:
                iv = comp.deltas[key]
                rows.append({"group": comp.group, "first": comp.a_label, "second": comp.b_label, "metric": key,
                             "diff": iv.estimate, "lo": iv.low, "hi": iv.high, "n": iv.n,
                             "verdict": line_verdict(comp, key, target)[0]})
    return rows


def basin_rows(cells: Sequence[CellResult]) -> list[dict[str, Any]]:
    """Each cell's main bracket (edges as LRs), its width and the width's interval (CI over seeds, or bracket)."""
    rows = []
    for c in cells:
        b, w = c.basin.main, c.basin.width
        edges = ({"lower_lo": b.lower_lo, "lower_hi": b.lower_hi, "upper_lo": b.upper_lo, "upper_hi": b.upper_hi,
                  "lower_open": str(b.lower_open).lower(), "upper_open": str(b.upper_open).lower()} if b else
                 dict.fromkeys(BASIN_COLUMNS[1:7], ""))
        rows.append({"cell": c.name, **edges, "width": w.estimate, "width_lo": w.low, "width_hi": w.high,
                     "seeds": len(c.basin.brackets)})
    return rows


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Floats with full precision; NaN as an empty field; inf as 'inf' (an open edge's bound)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()})
    return path
