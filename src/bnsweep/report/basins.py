"""A cell's LR basin as brackets of both edges, one per seed of its LR search, and how two cells' basins compare.

The LR search (sweep/search.py) stores each trial's ``seed`` and the cell study's ``basin`` attribute
(``low``, ``high``: the hard limits it may widen to). Each seed's trials give one ``sweep.basin.Bracket``.
One seed: the width is that bracket (an interval the grid allows). Several seeds with closed brackets: the
mean width over seeds with its 95% t-CI. An open edge is a bound, never a width: "at least".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial

from bnsweep.report.stats import Interval, mean_ci, paired_diff
from bnsweep.sweep.basin import LR_KEY, Bracket, bracket, trial_points
from bnsweep.sweep.slots import is_repeat

EDGE_OPEN = "edge open"  # Interval.kind of a width (or a difference) that an open edge leaves unbounded


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

    def _width(self) -> Interval:
        if len(self.brackets) >= 2 and len(self.closed) >= 2:
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


def search_limits(study_attrs: Mapping, search_range: tuple[float, float]) -> tuple[float, float]:
    """The LR search's hard limits: the study's ``basin`` attribute, else (older studies) the search range."""
    basin = study_attrs.get("basin") or {}
    return float(basin.get("low", search_range[0])), float(basin.get("high", search_range[1]))


def cell_basin(trials: Iterable[FrozenTrial], low: float, high: float, target: float,
               main_seed: int | None = None) -> Basin:
    """Group the LR-search trials (never repeats) by their ``seed`` user attribute and bracket each group."""
    groups: dict[int, list[FrozenTrial]] = {}
    for t in trials:
        if not is_repeat(t) and LR_KEY in t.params:
            groups.setdefault(int(t.user_attrs.get("seed", main_seed if main_seed is not None else 0)), []).append(t)
    brackets = {s: bracket(trial_points(g, target), low, high) for s, g in sorted(groups.items())}
    return Basin(brackets, low, high, main_seed)


def study_basin(study: optuna.Study, search_range: tuple[float, float], target: float) -> Basin:
    """The basin of one cell's study; its main seed is the lowest (the search's seed 0 trains with the cell's
    own seed, further basin seeds with ``seed + 1000 * i``)."""
    attrs = study.user_attrs
    return cell_basin(study.get_trials(deepcopy=False), *search_limits(attrs, search_range), target)


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
