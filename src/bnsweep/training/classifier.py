"""The LightningModule: cross-entropy training, validation checks within the epoch, divergence detection."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from bnsweep.training.bn_eval import batch_sums, evaluate, mean_loss_and_accuracy
from bnsweep.training.trainable import trainable

Chunk = list[tuple[torch.Tensor, torch.Tensor]]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf or exploded past ``max_loss``."""


class CheckCallback(pl.Callback):
    """A callback that also hears every validation check, the ones within an epoch included.

    Lightning's own validation hooks fire only at the epoch's end; checks every ``train.val_every``
    steps run inside a training chunk (see ``ClassifierModule``), so they are announced through this hook.
    """

    def on_validation_check(self, trainer: pl.Trainer, module: ClassifierModule, check: dict[str, float]) -> None:
        """``check``: step, samples, val_epoch, val_loss, val_acc (see ``ClassifierModule.checks``)."""


class ClassifierModule(pl.LightningModule):
    """Trains ``model`` with cross-entropy; validates every ``val_every`` steps of an epoch and at its end.

    Optimization is manual so that one call can run a whole chunk of mini-batches (see
    ``data.MinibatchChunks``); each mini-batch is still one ordinary optimizer step. Checks within an
    epoch run at the exact step, inside the chunk (Lightning's ``val_check_interval`` counts chunks of
    ``data.chunk_steps`` steps, and skips the epoch's end unless it divides the epoch); the check at the
    epoch's end is Lightning's own validation loop, as without ``val_every``.
    """

    def __init__(self, model: nn.Module, optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 max_loss: float = 1e3, val_every: int | None = None, train_size: int = 1) -> None:
        super().__init__()
        self.model, self.make_optimizer, self.max_loss = model, optimizer, max_loss
        self.val_every, self.train_size = val_every, train_size
        self.automatic_optimization = False
        self.history: list[dict[str, float]] = []  # one row per completed epoch
        self.checks: list[dict[str, float]] = []  # one row per validation check
        self.steps = 0  # optimizer steps so far
        self.samples = 0  # training samples seen so far (all DDP ranks)
        self._sums: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(trainable(self.model))  # train.trainable: frozen ones stay out

    # ------------------------------------------------------------------ training

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_steps = 0  # the within-epoch check cadence restarts each epoch, as Lightning's would
        self._sums["train"] = torch.zeros(3, device=self.device)  # loss*n, correct, n

    def training_step(self, chunk: Chunk, chunk_idx: int) -> None:
        opt = self.optimizers()
        sums = self._sums["train"]
        last_chunk = chunk_idx == self.trainer.num_training_batches - 1
        for i, (x, y) in enumerate(chunk):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()
            sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum(), sums.new_tensor(len(y))])
            self.steps, self._epoch_steps = self.steps + 1, self._epoch_steps + 1
            self.samples += len(y) * self.trainer.world_size  # DDP: each rank holds its shard of the batch
            epoch_end = last_chunk and i == len(chunk) - 1  # Lightning's validation loop checks there
            if self.val_every and self._epoch_steps % self.val_every == 0 and not epoch_end:
                self._stop_if_diverged(sums)  # a diverged run is "diverged", not pruned for its NaN val_acc
                self._check(*self._validate())
        # One host sync per chunk: stop a diverging run at once instead of burning its budget.
        self._stop_if_diverged(sums)

    def _stop_if_diverged(self, sums: torch.Tensor) -> None:
        """Raise TrainingDiverged if the epoch's mean training loss so far is NaN/inf or above ``max_loss``.

        Under DDP the sums of all ranks decide, so every rank stops together.
        """
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
        self.log_dict({"val_loss": val_loss, "val_acc": val_acc})  # for Lightning's own callbacks
        if self.trainer.sanity_checking or "train" not in self._sums:
            return
        train_loss, train_acc = self._pop("train")
        self.history.append({
            "epoch": self.current_epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc,
            "epoch_time_s": time.perf_counter() - self._epoch_start, "step": self.steps,
        })
        self._check(val_loss, val_acc)

    def _check(self, val_loss: float, val_acc: float) -> None:
        """Record a validation check and announce it to the ``CheckCallback``s (which may prune the run)."""
        check = {"step": self.steps, "samples": self.samples, "val_epoch": self.samples / self.train_size,
                 "val_loss": val_loss, "val_acc": val_acc}
        self.checks.append(check)
        for callback in self.trainer.callbacks:
            if isinstance(callback, CheckCallback):
                callback.on_validation_check(self.trainer, self, check)

    def _validate(self) -> tuple[float, float]:
        """A check within the epoch: the validation loop's batches, as views of the tensors (no copies)."""
        dm = self.trainer.datamodule
        x, y, size = dm.tensors["val_x"], dm.tensors["val_y"], dm.eval_batch_size
        return evaluate(self.model, zip(x.split(size), y.split(size), strict=True))[0]

    def evaluate(self, chunks: Iterable[Chunk]) -> tuple[float, float]:
        """Mean loss and accuracy in eval mode (BN running statistics): one pass, no Lightning loop."""
        return evaluate(self.model, (batch for chunk in chunks for batch in chunk))[0]
