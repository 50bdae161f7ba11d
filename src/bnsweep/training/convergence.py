"""Run-level summaries computed from the per-epoch history; shared by training, sweeps and reports."""

from __future__ import annotations

import math
from collections.abc import Sequence


def epochs_to_converge(val_acc: Sequence[float], target: float, budget: int) -> tuple[int, int]:
    """First epoch (1-based) whose val_acc reaches ``target``, and 1 if it did else 0.

    A run that never reaches the target gets ``budget + 1`` (one more than the epochs it was
    allowed): it is censored, not missing, so it sorts after every converged run and medians
    over a sweep cell stay honest. Filter on ``converged == 1`` for means over converged runs.
    """
    for epoch, acc in enumerate(val_acc, 1):
        if acc >= target:
            return epoch, 1
    return budget + 1, 0


def lr_basin_decades(lrs: Sequence[float], accs: Sequence[float], target: float) -> float:
    """Width, in decades, of the learning-rate range whose runs reached ``target`` accuracy.

    log10(largest / smallest) LR among the trials with acc >= target: 0.0 when only one did,
    NaN when none did. Seed 004 claims BN widens this range.
    """
    ok = [lr for lr, acc in zip(lrs, accs, strict=True) if acc >= target and lr > 0]
    if not ok:
        return math.nan
    return math.log10(max(ok) / min(ok))
