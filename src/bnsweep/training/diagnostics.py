"""Per-layer training diagnostics (``train.diagnostics=true``): what BN is said to fix, measured.

Every ``train.diagnostics_every`` optimizer steps it records, for each hidden layer, the 15th/50th/85th
percentiles of the activation function's input (the 'internal covariate shift' view: does the
distribution drift, does it sit in sigmoid's flat tails?) and the L2 norm of the layer's weight
gradient (the vanishing-gradient view of seed 000). Hooks only read tensors, so the run's numbers do
not change; with the key off nothing is installed and nothing is paid. The result is one small CSV
artifact per run, ``diagnostics.csv``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from bnsweep.errors import check_range

ARTIFACT = "diagnostics.csv"
COLUMNS = ("step", "epoch", "layer", "p15", "p50", "p85", "grad_norm")
QUANTILES = (0.15, 0.5, 0.85)
MAX_VALUES = 1 << 20  # torch.quantile sorts: beyond this many values, a fixed stride subsample


class Diagnostics(pl.Callback):
    """Samples pre-activation percentiles (forward pre-hooks on the activations) and weight-gradient norms.

    Works with the module's manual optimization: Lightning calls ``on_after_backward`` after each
    ``manual_backward``. Values stay on the device until written, so sampling adds no host sync.
    """

    ARTIFACT = ARTIFACT

    def __init__(self, every: int = 50) -> None:
        self.every = int(check_range("train.diagnostics_every", every, 1))
        self.samples: list[tuple[int, int, str, torch.Tensor | None, torch.Tensor | None]] = []
        self._step = 0
        self._preact: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._weights: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, train: Mapping[str, Any]) -> Diagnostics | None:
        """The callback when ``train.diagnostics`` is on, else None."""
        return cls(train.get("diagnostics_every", 50)) if train.get("diagnostics") else None

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        model = module.model
        for name, child in model.named_children():
            if isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                self._weights[name] = child.weight
            elif name.endswith("_act"):  # models.BNNet names a block's activation <layer>_act
                hook = partial(self._record_input, name.removesuffix("_act"))
                self._handles.append(child.register_forward_pre_hook(hook))

    def _record_input(self, layer: str, act: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if act.training and self._step % self.every == 0:
            x = args[0].detach().flatten().float()
            if x.numel() > MAX_VALUES:
                x = x[:: x.numel() // MAX_VALUES + 1]
            self._preact[layer] = torch.quantile(x, x.new_tensor(QUANTILES))

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._step % self.every == 0:
            epoch = trainer.current_epoch + 1
            for layer, w in self._weights.items():
                norm = torch.linalg.vector_norm(w.grad.detach()) if w.grad is not None else None
                self.samples.append((self._step, epoch, layer, self._preact.pop(layer, None), norm))
            self._preact.clear()
        self._step += 1

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.remove()

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ output

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for step, epoch, layer, q, norm in self.samples:
            p = [f"{v:.6g}" for v in q.tolist()] if q is not None else [""] * 3
            g = "" if norm is None else f"{float(norm):.6g}"
            out.append(dict(zip(COLUMNS, (step, epoch, layer, *p, g), strict=True)))
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows())
        return buf.getvalue()


def read_csv(text: str) -> list[dict[str, Any]]:
    """Rows of a ``diagnostics.csv``: numbers as floats, a missing value as NaN."""
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        rows.append({k: (v if k == "layer" else float(v) if v != "" else float("nan")) for k, v in r.items()})
    return rows
