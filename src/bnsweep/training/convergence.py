"""A run's convergence, computed from its validation checks: epochs (fractional) and steps to the target.

A run validates every ``train.val_every`` optimizer steps within each epoch (counted from the epoch's
start) and at the end of every epoch (a *check*).
Epochs to the target are counted in training samples seen, so a run that reaches it at the third of
four checks in its first epoch gets ~0.75, not 1: within-epoch differences between cells stay visible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple


class Check(NamedTuple):
    """One validation check: optimizer steps and training samples seen so far, and the val accuracy then."""

    step: int
    samples: int
    val_acc: float


class Convergence(NamedTuple):
    epochs: float  # samples seen / training-set size at the first check reaching the target
    steps: int  # optimizer steps at that check
    converged: int  # 1 if a check reached the target, else 0 (epochs and steps are then censored)


def first_reaching(checks: Sequence[Check], target: float, train_size: int, budget: int,
                   steps_per_epoch: int) -> Convergence:
    """The first check whose val_acc reaches ``target``, in fractional epochs and in optimizer steps.

    A run that never reaches it is censored, not missing: ``budget + 1`` epochs (one more than it
    was allowed) and ``(budget + 1) * steps_per_epoch`` steps, so it sorts after every converged run
    and medians over a sweep cell stay honest. Filter on ``converged == 1`` for means over converged runs.
    """
    for check in checks:
        if check.val_acc >= target:
            return Convergence(check.samples / train_size, check.step, 1)
    return Convergence(float(budget + 1), (budget + 1) * steps_per_epoch, 0)


def epochs_to_converge(val_acc: Sequence[float], target: float, budget: int) -> tuple[int, int]:
    """First whole epoch (1-based) whose end-of-epoch val_acc reaches ``target``, and 1 if it did else 0.

    The per-epoch view of ``first_reaching`` (one check per epoch, censored at ``budget + 1``).
    """
    got = first_reaching([Check(e, e, acc) for e, acc in enumerate(val_acc, 1)], target, 1, budget, 1)
    return int(got.epochs), got.converged


def convergence_metrics(checks: Sequence[Check], history: Sequence[Mapping[str, float]], target_acc: float,
                        budget: int, train_size: int, steps_per_epoch: int) -> dict[str, float]:
    """best_val_acc, epochs_to_converge, steps_to_converge, converged and epochs_run of a run.

    ``checks``: every validation check; ``history``: one row per completed epoch; ``budget``: the
    epochs the run was allowed (the censoring, see ``first_reaching``).
    """
    got = first_reaching(checks, target_acc, train_size, budget, steps_per_epoch)
    return {"best_val_acc": max((c.val_acc for c in checks), default=0.0), "epochs_to_converge": got.epochs,
            "steps_to_converge": got.steps, "converged": got.converged, "epochs_run": len(history)}
