"""The LR basin of a cell: the learning rates of its LR search whose trials reached the target accuracy.

Seed 004 claims BN widens this range. ``Bracket`` holds where its two edges lie; the LR search
(``sweep.search``), ``table.cell_row`` and the report (``report.basins``, one bracket per seed) all build it
with ``bracket(trial_points(...))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

LR_KEY = "optimizer.lr"


def measured(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that finished with metrics: complete, or pruned (diverged runs are pruned too)."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "metrics" in t.user_attrs]


def basin_points(trials: Iterable[FrozenTrial]) -> tuple[list[float], list[float]]:
    """(learning rates, best val accs) of the ``measured`` trials with an LR: what the basin is measured on.

    A trial without ``best_val_acc`` counts as 0.0. Pass the LR search only (no repeats).
    """
    with_lr = [t for t in measured(trials) if LR_KEY in t.params]
    return [t.params[LR_KEY] for t in with_lr], [t.user_attrs["metrics"].get("best_val_acc", 0.0) for t in with_lr]


def reached(lrs: Sequence[float], accs: Sequence[float], target: float) -> list[float]:
    """The learning rates (> 0) whose runs reached ``target`` accuracy, in the order given."""
    return [lr for lr, acc in zip(lrs, accs, strict=True) if acc >= target and lr > 0]


def lr_basin_decades(lrs: Sequence[float], accs: Sequence[float], target: float) -> float:
    """Width, in decades, of the learning-rate range whose runs reached ``target`` accuracy.

    log10(largest / smallest) LR among the trials with acc >= target: 0.0 when only one did,
    NaN when none did.
    """
    ok = reached(lrs, accs, target)
    if not ok:
        return math.nan
    return math.log10(max(ok) / min(ok))


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
