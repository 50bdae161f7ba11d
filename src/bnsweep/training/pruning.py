"""Optuna pruning at every validation check, not once per epoch.

Optuna's Lightning integration (``PyTorchLightningPruningCallback``) reports once per epoch at step = epoch, so
several checks within an epoch would collide on one step. Here every check is reported at step =
the run's optimizer steps so far (``Check.step``): the checks of a cell's trials (same data, batch
size and ``train.val_every``, only the learning rate differs) fall on the same steps, which is what
``MedianPruner`` compares. Its ``n_warmup_steps`` and Hyperband's resources therefore count
optimizer steps, not epochs: one epoch is ceil(train images / data.batch_size) steps (1719 for
MNIST's 55,000 at batch 32; a last batch of one is merged). The old ``n_warmup_steps: 1`` (epoch 1
spared, reported at step 0) is ``n_warmup_steps: 1720`` now: no check up to and including the first
epoch's end can prune; ``n_warmup_steps: 1`` would let the first check (step ``train.val_every``) prune.
Hyperband's ``max_resource`` must be in steps too (``"auto"`` reads it from finished trials).
"""

from __future__ import annotations

import lightning.pytorch as pl
import optuna

from bnsweep.training.classifier import CheckCallback, ClassifierModule


def report_check(trial: optuna.Trial, check: dict[str, float], monitor: str = "val_acc") -> bool:
    """Report ``check`` to ``trial`` at step = optimizer steps; True if the pruner says stop.

    Shared by single runs (``CheckPruning``) and population members (population/loop.py).
    """
    trial.report(float(check[monitor]), step=int(check["step"]))
    return trial.should_prune()


class CheckPruning(CheckCallback):
    """Reports every validation check to an Optuna trial and raises ``optuna.TrialPruned`` when told to stop."""

    def __init__(self, trial: optuna.Trial, monitor: str = "val_acc") -> None:
        self.trial, self.monitor = trial, monitor

    def on_validation_check(self, trainer: pl.Trainer, module: ClassifierModule, check: dict[str, float]) -> None:
        if report_check(self.trial, check, self.monitor):
            raise optuna.TrialPruned(f"pruned at step {int(check['step'])} (epoch {check['val_epoch']:.2f}): "
                                     f"{self.monitor} {check[self.monitor]:.4f}")
