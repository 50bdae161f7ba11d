"""The LightningModule: cross-entropy training, per-epoch history, divergence detection."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from bnsweep.training.bn_eval import batch_sums, evaluate, mean_loss_and_accuracy

Chunk = list[tuple[torch.Tensor, torch.Tensor]]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf or exploded past ``max_loss``."""


class ClassifierModule(pl.LightningModule):
    """Trains ``model`` with cross-entropy; records one history row per epoch.

    Optimization is manual so that one call can run a whole chunk of mini-batches (see
    ``data.MinibatchChunks``); each mini-batch is still one ordinary optimizer step.
    """

    def __init__(self, model: nn.Module, optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 max_loss: float = 1e3) -> None:
        super().__init__()
        self.model, self.make_optimizer, self.max_loss = model, optimizer, max_loss
        self.automatic_optimization = False
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.model.parameters())

    # ------------------------------------------------------------------ training

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._sums["train"] = torch.zeros(3, device=self.device)  # loss*n, correct, n

    def training_step(self, chunk: Chunk, chunk_idx: int) -> None:
        opt = self.optimizers()
        sums = self._sums["train"]
        for x, y in chunk:
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()
            sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum(), sums.new_tensor(len(y))])
        # One host sync per chunk: stop a diverging run at once instead of burning its budget.
        # Under DDP the sums of all ranks decide, so every rank stops together.
        total = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum") if self.trainer.world_size > 1 else sums
        mean_loss = float(total[0] / total[2])
        if not math.isfinite(mean_loss) or mean_loss > self.max_loss:
            raise TrainingDiverged(
                f"training loss {mean_loss:.3g} in epoch {self.current_epoch + 1} "
                f"(limit train.max_loss={self.max_loss:g})"
            )

    # ------------------------------------------------------------------ evaluation

    def _pop(self, split: str) -> tuple[float, float]:
        sums = self._sums.pop(split)
        if split == "train" and self._trainer is not None and self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")  # each rank trained on its shard
        return mean_loss_and_accuracy(sums)[0]

    def validation_step(self, chunk: Chunk, chunk_idx: int) -> None:
        sums = self._sums.setdefault("val", torch.zeros(3, device=self.device))
        for x, y in chunk:
            sums += batch_sums(self.model(x), y)

    def on_validation_epoch_end(self) -> None:
        val_loss, val_acc = self._pop("val")
        self.log_dict({"val_loss": val_loss, "val_acc": val_acc})  # for pruning callbacks
        if self.trainer.sanity_checking or "train" not in self._sums:
            return
        train_loss, train_acc = self._pop("train")
        self.history.append({
            "epoch": self.current_epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc,
            "epoch_time_s": time.perf_counter() - self._epoch_start,
        })

    def evaluate(self, chunks: Iterable[Chunk]) -> tuple[float, float]:
        """Mean loss and accuracy in eval mode (BN running statistics): one pass, no Lightning loop."""
        return evaluate(self.model, (batch for chunk in chunks for batch in chunk))[0]
