"""The LR basin of a cell: the learning rates of its LR search whose trials reached the target accuracy.

Seed 004 claims BN widens this range. ``table.cell_row`` reports its width, the report brackets it
(``report.stats.basin_bracket``); both take their points from ``basin_points``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

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
