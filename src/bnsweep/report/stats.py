"""Intervals for the report: t-based 95% CIs of means and paired differences, bracket differences.

A report sentence states a conclusion only when its interval excludes 0 (``Interval.sign``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

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
        if (self.kind.endswith("CI") and self.n < 2) or self.kind == "edge open" or math.isnan(self.estimate):
            return 0
        if self.low > 0:
            return 1
        if self.high < 0:
            return -1
        return 0


    @property
    def half_width(self) -> float:
        """Half the interval's width: differences smaller than this cannot be told from 0 with this data."""
        return (self.high - self.low) / 2 if not (math.isnan(self.low) or math.isnan(self.high)) else math.inf

    @property
    def verdict(self) -> str:
        """``greater`` / ``less`` (the interval excludes 0 on that side) or ``not_resolved``."""
        return {1: "greater", -1: "less", 0: "not_resolved"}[self.sign]


def format_interval(iv: Interval, fmt: str = "{:.2f}", template: str = "{est} [{low}, {high}]",
                    alone: str = "{est}") -> str:
    """``iv`` as text: '-' without an estimate, ``alone`` without an interval (NaN low), else ``template``.

    The templates' fields: ``est``, ``low``, ``high`` (each written with ``fmt``), ``n`` and ``what``
    ("95% CI, n=<n>", else the kind: "bracket", "edge open"). (A basin bracket always has both ends where it
    has an estimate.)
    """
    if math.isnan(iv.estimate):
        return "-"
    fields = {"est": fmt.format(iv.estimate), "n": iv.n,
              "what": f"95% CI, n={iv.n}" if iv.kind.endswith("CI") else iv.kind}
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


def bracket_diff(a: Interval, b: Interval) -> Interval:
    """a - b for brackets: every value the difference can take given both ranges."""
    return Interval(a.estimate - b.estimate, a.low - b.high, a.high - b.low, min(a.n, b.n), "bracket")
