"""The LR basin of a cell: the learning rates of its LR search whose trials reached the target accuracy.

Seed 004 claims BN widens this range. ``Bracket`` holds where its two edges lie (one seed's LR search);
``Basin`` holds one bracket per basin seed and the width over them. The LR search (``sweep.search``) builds
brackets with ``bracket(trial_points(...))``; the table, summary.csv, the dashboard and the report all read
one ``Basin`` per cell (``study_basin``), within the limits ``search_limits`` gives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from bnsweep.stats import Interval, mean_ci, paired_diff

LR_KEY = "optimizer.lr"
EDGE_OPEN = "edge open"  # Interval.kind of a width (or a difference) that an open edge leaves unbounded


def is_repeat(t: FrozenTrial) -> bool:
    """A re-run of the cell's best LR with a fresh seed (slots n_trials..), not an LR-search trial."""
    return "repeat" in t.user_attrs


def measured(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that finished with metrics: complete, or pruned (diverged runs are pruned too)."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "metrics" in t.user_attrs]


# ---------------------------------------------------------------- the basin as a bracket of both edges
# The contract shared by the LR search (sweep/search.py), the table, the report and basins.csv.


@dataclass(frozen=True)
class Bracket:
    """Where a basin's two edges lie, as learning rates, given which LRs were tried.

    The lower edge lies in [lower_lo, lower_hi]: lower_hi is the smallest LR that reached the target,
    lower_lo the largest tried LR below it that missed (or, when none did, the search's low limit and
    ``lower_open``). The upper edge likewise lies in [upper_lo, upper_hi]. An open edge is a bound, never
    a measurement: the width is then only "at least".
    """

    lower_lo: float
    lower_hi: float
    upper_lo: float
    upper_hi: float
    lower_open: bool
    upper_open: bool

    @property
    def closed(self) -> bool:
        return not (self.lower_open or self.upper_open)

    @property
    def width(self) -> float:
        """Estimated width in decades: between the edges' geometric midpoints (an open edge: its reached LR)."""
        lo = self.lower_hi if self.lower_open else math.sqrt(self.lower_lo * self.lower_hi)
        hi = self.upper_lo if self.upper_open else math.sqrt(self.upper_lo * self.upper_hi)
        return math.log10(hi / lo)

    @property
    def width_lo(self) -> float:
        """The least the width can be: from the smallest to the largest LR that reached."""
        return math.log10(self.upper_lo / self.lower_hi)

    @property
    def width_hi(self) -> float:
        """The most the width can be (inf where an edge is open)."""
        return math.inf if not self.closed else math.log10(self.upper_hi / self.lower_lo)

    def edge_resolution(self) -> float:
        """The wider of the two closed edges' brackets, in decades (inf if an edge is open)."""
        if not self.closed:
            return math.inf
        return max(math.log10(self.lower_hi / self.lower_lo), math.log10(self.upper_hi / self.upper_lo))


def trial_points(trials: Iterable[FrozenTrial], target: float) -> list[tuple[float, bool]]:
    """(LR, reached the target?) of the LR-search trials that are evidence about the basin.

    Evidence: a completed trial (its best val acc against ``target``) or a diverged one (missed). A pruned
    trial that did not diverge never got its budget, so it says nothing about an edge and is left out.
    Pass one seed's LR search only (no repeats).
    """
    out = []
    for t in measured(trials):
        if LR_KEY not in t.params:
            continue
        if t.state == TrialState.COMPLETE:
            out.append((t.params[LR_KEY], t.user_attrs["metrics"].get("best_val_acc", 0.0) >= target))
        elif t.user_attrs.get("diverged"):
            out.append((t.params[LR_KEY], False))
    return out


def bracket(points: Iterable[tuple[float, bool]], low: float, high: float) -> Bracket | None:
    """The basin's bracket from (LR, reached) points; ``low``/``high``: the search's hard limits.

    None when no LR reached the target. The basin is taken as the span from the smallest to the
    largest LR that reached (a miss inside it is noise at that LR, not a second basin).
    """
    pts = sorted((lr, ok) for lr, ok in points if lr > 0)
    ok = [lr for lr, r in pts if r]
    if not ok:
        return None
    a, b = min(ok), max(ok)
    below = [lr for lr, r in pts if not r and lr < a]
    above = [lr for lr, r in pts if not r and lr > b]
    return Bracket(lower_lo=max(below, default=low), lower_hi=a, upper_lo=b, upper_hi=min(above, default=high),
                   lower_open=not below, upper_open=not above)


# ---------------------------------------------------------------- the basin over several seeds


@dataclass
class Basin:
    """One cell's basin: a bracket per seed (None: no LR reached the target), the limits searched."""

    brackets: dict[int, Bracket | None]
    low: float
    high: float
    main_seed: int | None = None
    width: Interval = field(init=False)

    def __post_init__(self) -> None:
        self.width = self._width()

    @property
    def main(self) -> Bracket | None:
        if self.main_seed in self.brackets:
            return self.brackets[self.main_seed]
        return next(iter(self.brackets.values()), None)

    @property
    def closed(self) -> dict[int, Bracket]:
        return {s: b for s, b in self.brackets.items() if b is not None and b.closed}

    @property
    def over_seeds(self) -> bool:
        """Whether ``width`` is a mean with a 95% CI over seeds (>= 2 closed brackets), not one bracket."""
        return len(self.brackets) >= 2 and len(self.closed) >= 2

    def _width(self) -> Interval:
        if self.over_seeds:
            return mean_ci([b.width for b in self.closed.values()])
        b = self.main
        if b is None:
            return Interval(math.nan, math.nan, math.nan, len(self.brackets), "bracket")
        return Interval(b.width, b.width_lo, b.width_hi, 1, "bracket" if b.closed else EDGE_OPEN)

    def describe(self) -> str:
        """As a researcher reads it: '1.50 dec. [1.25, 1.75] (bracket)', '≥ 2.40 dec., upper edge open at 1e+03'.
        """
        b = self.main
        if b is None:
            return "no LR reached the target"
        if self.width.kind == EDGE_OPEN:
            edges = ([f"lower edge open at {b.lower_lo:.3g}"] * b.lower_open
                     + [f"upper edge open at {b.upper_hi:.3g}"] * b.upper_open)
            return f"≥ {b.width_lo:.2f} dec., {' and '.join(edges)}"
        what = "bracket" if self.width.kind == "bracket" else f"95% CI over {self.width.n} seeds"
        return f"{self.width.estimate:.2f} dec. [{self.width.low:.2f}, {self.width.high:.2f}] ({what})"


def search_limits(study_attrs: Mapping, search_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """The LR search's hard limits, the one rule for every reader: the study's ``basin`` attribute (the
    bracketing search), else the range of its searched LR distribution (a sampler's search), else
    ``search_range``, else (0, inf)."""
    basin = study_attrs.get("basin") or {}
    if "low" in basin and "high" in basin:
        return float(basin["low"]), float(basin["high"])
    dist = (study_attrs.get("search") or {}).get(LR_KEY)
    if dist:
        d = optuna.distributions.json_to_distribution(dist) if isinstance(dist, str) else dist
        if isinstance(d, optuna.distributions.CategoricalDistribution):  # a fixed list of rates
            return float(min(d.choices)), float(max(d.choices))
        return float(d.low), float(d.high)
    return (float(search_range[0]), float(search_range[1])) if search_range is not None else (0.0, math.inf)


def seed_of(t: FrozenTrial, default: int = 0) -> int:
    """The basin seed an LR-search trial belongs to: its ``basin_seed`` index (the bracketing search's
    ``search.SEED_INDEX``), else its training ``seed`` (a sampler's search, older studies), else ``default``."""
    return int(t.user_attrs.get("basin_seed", t.user_attrs.get("seed", default)))


def cell_basin(trials: Iterable[FrozenTrial], low: float, high: float, target: float,
               main_seed: int | None = None) -> Basin:
    """Group the finished LR-search trials (never repeats) by basin seed (``seed_of``) and bracket each group.

    Only finished trials (``measured``) count, so a seed whose trials are all still running has no bracket
    yet rather than "no LR reached the target".
    """
    groups: dict[int, list[FrozenTrial]] = {}
    for t in measured(trials):
        if not is_repeat(t) and LR_KEY in t.params:
            groups.setdefault(seed_of(t, main_seed if main_seed is not None else 0), []).append(t)
    brackets = {s: bracket(trial_points(g, target), low, high) for s, g in sorted(groups.items())}
    return Basin(brackets, low, high, main_seed)


def study_basin(study: optuna.Study, search_range: tuple[float, float] | None, target: float) -> Basin:
    """The basin of one cell's study, within ``search_limits`` (``search_range``: only for a study that says
    nothing of its limits). Its main seed is the lowest: the search's seed 0 trains with the cell's own seed,
    further basin seeds with ``seed + 1000 * i``."""
    return cell_basin(study.get_trials(deepcopy=False), *search_limits(study.user_attrs, search_range), target)


def basin_diff(a: Basin, b: Basin) -> Interval:
    """a's width minus b's: paired by seed when both have closed brackets for >= 2 common seeds, else
    every value the two brackets allow; an open edge on either side makes it unresolvable (kind EDGE_OPEN)."""
    common = set(a.closed) & set(b.closed)
    if len(common) >= 2:
        return paired_diff({s: a.closed[s].width for s in common}, {s: b.closed[s].width for s in common})
    ba, bb = a.main, b.main
    if ba is None or bb is None:
        return Interval(math.nan, math.nan, math.nan, 0, "bracket")
    est = ba.width - bb.width
    if not (ba.closed and bb.closed):
        return Interval(est, ba.width_lo - bb.width_hi, ba.width_hi - bb.width_lo, 1, EDGE_OPEN)
    return Interval(est, ba.width_lo - bb.width_hi, ba.width_hi - bb.width_lo, 1, "bracket")
