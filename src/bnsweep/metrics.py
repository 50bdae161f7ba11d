"""Run-level summaries computed from the per-epoch history; shared by training, sweeps and reports."""

from __future__ import annotations

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
