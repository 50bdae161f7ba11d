"""Intervals for the report: t-based 95% CIs of means and paired differences, LR-basin brackets.

A report sentence states a conclusion only when its interval excludes 0 (``Interval.sign``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

from bnsweep.sweep.basin import lr_basin_decades, reached

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with an interval: a t-based CI over ``n`` values, or a bracket (``kind``)."""

    estimate: float
    low: float
    high: float
    n: int
    kind: str = "95% CI"

    @property
    def sign(self) -> int:
        """+1 / -1 when the whole interval is above / below 0, else 0 ("not resolved")."""
        if self.kind.endswith("CI") and self.n < 2:
            return 0
        if self.low > 0:
            return 1
        if self.high < 0:
            return -1
        return 0


def format_interval(iv: Interval, fmt: str = "{:.2f}", template: str = "{est} [{low}, {high}]",
                    alone: str = "{est}") -> str:
    """``iv`` as text: '-' without an estimate, ``alone`` without an interval (NaN low), else ``template``.

    The templates' fields: ``est``, ``low``, ``high`` (each written with ``fmt``), ``n`` and ``what``
    ("bracket", or "95% CI, n=<n>"). (A basin bracket always has both ends where it has an estimate.)
    """
    if math.isnan(iv.estimate):
        return "-"
    fields = {"est": fmt.format(iv.estimate), "n": iv.n,
              "what": "bracket" if iv.kind == "bracket" else f"95% CI, n={iv.n}"}
    if math.isnan(iv.low):
        return alone.format(**fields)
    return template.format(low=fmt.format(iv.low), high=fmt.format(iv.high), **fields)


def t_quantile(n: int, level: float = LEVEL) -> float:
    """The two-sided t quantile for a ``level`` interval from ``n`` values (n - 1 degrees of freedom)."""
    return float(_scipy_stats.t.ppf((1 + level) / 2, n - 1))


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and t-interval (mean +- t * s / sqrt(n), s with n - 1); NaNs are dropped; n < 2 has no interval."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(vals) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(n, level) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_diff(a: Mapping[Hashable, float], b: Mapping[Hashable, float], level: float = LEVEL) -> Interval:
    """Mean of a[k] - b[k] over the keys (seeds) both have, with its t-interval: the paired comparison."""
    keys = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    return mean_ci([a[k] - b[k] for k in keys], level)


def basin_bracket(lrs: Sequence[float], accs: Sequence[float], target: float, low: float, high: float) -> Interval:
    """LR-basin width (decades) and the range the true width lies in, given which LRs were tried.

    The basin is measured once per cell (by its LR search), so its uncertainty is the grid's
    resolution: each edge lies between the last LR that reached ``target`` and the next one tried
    (or the searched range's end, ``low``/``high``). With no LR reaching it, the width is 0 up to the
    widest gap between tried LRs. Estimate: ``sweep.basin.lr_basin_decades`` (0 instead of NaN).
    """
    tried = sorted(lr for lr in lrs if lr > 0)
    est = lr_basin_decades(lrs, accs, target)
    if not tried:
        return Interval(math.nan, math.nan, math.nan, 0, "bracket")
    if math.isnan(est):
        edges = [low, *tried, high]
        gap = max(math.log10(b / a) for a, b in zip(edges, edges[1:], strict=False))
        return Interval(0.0, 0.0, gap, len(tried), "bracket")
    ok = reached(lrs, accs, target)
    lo_ok, hi_ok = min(ok), max(ok)
    left = max((lr for lr in tried if lr < lo_ok), default=low)
    right = min((lr for lr in tried if lr > hi_ok), default=high)
    return Interval(est, est, math.log10(right / left), len(tried), "bracket")


def bracket_diff(a: Interval, b: Interval) -> Interval:
    """a - b for brackets: every value the difference can take given both ranges."""
    return Interval(a.estimate - b.estimate, a.low - b.high, a.high - b.low, min(a.n, b.n), "bracket")
