"""A run's convergence, computed from its per-epoch history: epochs to the target accuracy, best val acc."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


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


def convergence_metrics(history: Sequence[Mapping[str, float]], target_acc: float, budget: int) -> dict[str, float]:
    """best_val_acc, epochs_to_converge, converged and epochs_run of a run, from its per-epoch history.

    ``budget``: the epochs the run was allowed (the censoring of ``epochs_to_converge``).
    """
    val = [row["val_acc"] for row in history]
    epochs, converged = epochs_to_converge(val, target_acc, budget)
    return {"best_val_acc": max(val, default=0.0), "epochs_to_converge": epochs,
            "converged": converged, "epochs_run": len(val)}
