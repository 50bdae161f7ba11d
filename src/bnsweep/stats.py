"""Intervals for the report: t-based 95% CIs of means and paired differences, bracket differences.

A verdict comes from a test's p-value (below), never from an interval alone.
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
    def half_width(self) -> float:
        """Half the interval's width: differences smaller than this cannot be told from 0 with this data."""
        return (self.high - self.low) / 2 if not (math.isnan(self.low) or math.isnan(self.high)) else math.inf


def decimals(half_width: float, scale: float = 1.0, least: int = 0, most: int = 6) -> int:
    """Decimals that fit an interval: two significant digits of its half-width (x ``scale``), so no
    "-0.0 [-0.0, +0.0]"; a zero or unknown half-width keeps ``least``."""
    hw = abs(half_width) * scale
    if not math.isfinite(hw) or hw == 0:
        return least
    return max(least, min(most, 1 - math.floor(math.log10(hw))))


def fit_digits(iv: Interval, scale: float = 1.0, signed: bool = True, unit: str = "", least: int = 0) -> str:
    """``iv`` x ``scale`` as '+1.5 [+0.9, +2.1]' with the digits its width supports; '-' without an estimate;
    the estimate alone where there is no interval; '+1.25 (the same on all 3 seeds)' for a zero-width one."""
    if math.isnan(iv.estimate):
        return "-"
    d = decimals(iv.half_width, scale, least)
    f = (lambda v: f"{v * scale:+.{d}f}") if signed else (lambda v: f"{v * scale:.{d}f}")
    if math.isnan(iv.low) or math.isnan(iv.high):
        return f"{f(iv.estimate)}{unit}"
    if iv.half_width == 0:
        d = max(least, 2)
        f = (lambda v: f"{v * scale:+.{d}f}") if signed else (lambda v: f"{v * scale:.{d}f}")
        return f"{f(iv.estimate)}{unit} (the same on all {iv.n})"
    high = "inf" if math.isinf(iv.high) else f(iv.high)
    return f"{f(iv.estimate)}{unit} [{f(iv.low)}, {high}]"


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


# ---------------------------------------------------------------------- tests behind a verdict
# A verdict comes from a p-value (after the multiple-comparison correction), never from an interval alone:
# continuous paired values get a t-test; values on a lattice (basin edges and widths in 0.25 decade) an exact
# sign-flip permutation test; censored values (epochs to target of a run that never got there) a paired
# sign test on the orderings that censoring still allows.

ALPHA = 0.05


@dataclass(frozen=True)
class Test:
    """One comparison's evidence: the effect with its interval, and the p-values for and against the claim.

    ``p_for``: the test of the side (or the margin) the claim predicts; ``p_against``: of the other side.
    ``method`` names the test, as the report states it.
    """

    iv: Interval
    p_for: float
    p_against: float
    method: str
    note: str = ""
    pairs: int = 0  # pairs the test saw (censored ones too), where the interval covers fewer

    @property
    def p(self) -> float:
        """The row's p-value: the smaller side (what the correction is applied to)."""
        return min(self.p_for, self.p_against)


def _clean(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def t_sides(diffs: Sequence[float], shift: float = 0.0) -> tuple[float, float]:
    """One-sided t-test p-values (mean > shift, mean < shift) over paired differences; (1, 1) without spread.

    Zero spread gives no t-test: such data (e.g. values on a lattice) needs ``sign_flip_sides``.
    """
    d = _clean(diffs)
    n = len(d)
    if n < 2:
        return 1.0, 1.0
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (n - 1))
    if sd == 0:
        return 1.0, 1.0
    t = (mean - shift) / (sd / math.sqrt(n))
    return float(_scipy_stats.t.sf(t, n - 1)), float(_scipy_stats.t.cdf(t, n - 1))


def sign_flip_sides(diffs: Sequence[float], exact_up_to: int = 16, draws: int = 20000) -> tuple[float, float]:
    """Exact paired permutation test (every sign flip of the differences) of mean > 0 and mean < 0.

    With n pairs the smallest p is 1 / 2**n: 3 seeds can never give p < 0.125. Beyond ``exact_up_to`` pairs,
    a seeded Monte Carlo draw of the flips.
    """
    d = [v for v in _clean(diffs)]
    n = len(d)
    if n == 0:
        return 1.0, 1.0
    obs = math.fsum(d)
    tol = 1e-12 * max(1.0, abs(obs))
    if n <= exact_up_to:
        import itertools

        sums = [math.fsum(s * v for s, v in zip(signs, d, strict=True))
                for signs in itertools.product((1, -1), repeat=n)]
    else:
        import random

        rng = random.Random(0)
        sums = [obs] + [math.fsum(v if rng.random() < 0.5 else -v for v in d) for _ in range(draws - 1)]
    ge = sum(s >= obs - tol for s in sums) / len(sums)
    le = sum(s <= obs + tol for s in sums) / len(sums)
    return ge, le


def sign_test_sides(signs: Sequence[int]) -> tuple[float, float]:
    """Exact binomial sign test of the pairs' orderings (+1 / -1; ties, 0, are dropped): P(more +), P(more -)."""
    pos, neg = sum(s > 0 for s in signs), sum(s < 0 for s in signs)
    n = pos + neg
    if n == 0:
        return 1.0, 1.0
    return float(_scipy_stats.binom.sf(pos - 1, n, 0.5)), float(_scipy_stats.binom.cdf(pos, n, 0.5))


def widened(iv: Interval, resolution: float) -> Interval:
    """``iv`` with a half-width of at least ``resolution``: a value on a lattice is known to that step only."""
    if math.isnan(iv.estimate) or iv.n < 2:
        return iv
    half = max(iv.half_width if math.isfinite(iv.half_width) else 0.0, resolution)
    return Interval(iv.estimate, iv.estimate - half, iv.estimate + half, iv.n, iv.kind)


def superiority(diffs: Sequence[float], expect: int, lattice: float = 0.0) -> Test:
    """first - second > 0 (expect +1) or < 0 (expect -1): a t-test, or on a lattice an exact sign-flip test
    with the interval at least one lattice step wide."""
    d = _clean(diffs)
    iv = mean_ci(d)
    if lattice:
        up, down = sign_flip_sides(d)
        iv, method = widened(iv, lattice), "exact sign-flip permutation test"
    else:
        up, down = t_sides(d)
        method = "paired t-test"
        if len(d) >= 2 and iv.half_width == 0:  # every pair differs by the same amount: no t-test exists
            up, down = sign_flip_sides(d)
            method = "exact sign-flip permutation test (no spread)"
    # two-sided p on the observed side; the other side gets 1
    p_up, p_down = min(1.0, 2 * up), min(1.0, 2 * down)
    p_for, p_against = (p_up, p_down) if expect > 0 else (p_down, p_up)
    return Test(iv, p_for, p_against, method)


def non_inferiority(diffs: Sequence[float], margin: float) -> Test:
    """first - second > -margin ("works as well, within the margin"): one-sided t-tests against -margin."""
    d = _clean(diffs)
    above, _ = t_sides(d, -margin)
    _, below = t_sides(d, -margin)
    return Test(mean_ci(d), above, below, f"non-inferiority t-test, margin {margin:g}")


def equivalence(diffs: Sequence[float], margin: float) -> Test:
    """|first - second| < margin: two one-sided t-tests (TOST); against: the difference lies beyond a margin."""
    d = _clean(diffs)
    above_low, below_low = t_sides(d, -margin)
    above_high, below_high = t_sides(d, margin)
    return Test(mean_ci(d), max(above_low, below_high), min(1.0, 2 * min(above_high, below_low)),
                f"equivalence (TOST), margin ±{margin:g}")


def censored_pairs(a: Sequence[tuple[float, bool]], b: Sequence[tuple[float, bool]], expect: int,
                   lattice: float = 0.0) -> Test:
    """Paired (time, reached) values where a run that never reached the target is censored at the budget.

    Each pair is ordered where the data allow it: both reached (compare the times), one reached (it was
    sooner), neither (a tie: unknown). An exact sign test on those orderings (Gehan's idea for pairs) gives the
    verdict; the interval is over the pairs where both reached (the censored ones are never averaged).
    """
    signs, both = [], []
    for (ta, ra), (tb, rb) in zip(a, b, strict=True):
        if ra and rb:
            signs.append((ta > tb) - (ta < tb))
            both.append(ta - tb)
        elif ra != rb:
            signs.append(-1 if ra else 1)
        else:
            signs.append(0)
    up, down = sign_test_sides(signs)
    p_up, p_down = min(1.0, 2 * up), min(1.0, 2 * down)
    iv = widened(mean_ci(both), lattice) if lattice else mean_ci(both)
    reached_a, reached_b = sum(r for _, r in a), sum(r for _, r in b)
    note = f"reached the target: {reached_a}/{len(a)} vs {reached_b}/{len(b)}"
    p_for, p_against = (p_up, p_down) if expect > 0 else (p_down, p_up)
    return Test(iv, p_for, p_against, "paired sign test for censored values", note, len(signs))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the order given."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def decide(test: Test, p_adjusted: float, alpha: float = ALPHA) -> str:
    """``supported`` / ``contradicted`` when the (corrected) p of the smaller side is below ``alpha``, else
    ``not_resolved``. A single pair or an undefined test never decides."""
    if test.iv.n < 2 or not p_adjusted < alpha:
        return "not_resolved"
    return "supported" if test.p_for <= test.p_against else "contradicted"
