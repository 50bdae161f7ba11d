"""Per-layer training diagnostics (``train.diagnostics=true``): what BN is said to fix, measured.

Every ``train.diagnostics_every`` optimizer steps it records, for each hidden layer ``fcN``/``convN``, at
three named points of its block:

- ``linear_in``: the Linear/Conv's input (layer 1: the network input, after any input BN; else the previous
  block's output, after any after_act BN);
- ``linear_out``: the Linear/Conv's output, before any BN;
- ``act_in``: the activation function's input (the 'internal covariate shift' view: does the distribution
  drift, does it sit in sigmoid's flat tails?);

the 15th/50th/85th percentiles and ``sat``: the fraction of values where the block's activation function's
derivative is below 10% of its maximum (sigmoid: |x| > ~3.7, relu: x <= 0, leaky_relu(0.3): never); plus
the L2 norm of the layer's weight gradient (the vanishing-gradient view of seed 000), repeated on each of
the layer's rows. The logits layer ``out`` has no activation: one ``act_in`` row with empty percentiles,
for its gradient norm. Hooks only read tensors, so the run's numbers do not change; with the key off
nothing is installed and nothing is paid. The result is one small CSV artifact per run, ``diagnostics.csv``.
"""

from __future__ import annotations

import copy
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
COLUMNS = ("step", "epoch", "layer", "point", "p15", "p50", "p85", "sat", "grad_norm")
POINTS = ("linear_in", "linear_out", "act_in")
QUANTILES = (0.15, 0.5, 0.85)
MAX_VALUES = 1 << 20  # torch.quantile sorts: beyond this many values, a fixed stride subsample
SAT_FRACTION = 0.1  # saturated: the activation's derivative below this fraction of its maximum
GRID = (-20.0, 20.0, 4001)  # where an activation's maximum derivative is looked for


def derivative(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The elementwise derivative of ``act`` at ``x`` (autograd on a detached copy: the run's graph is untouched)."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        (grad,) = torch.autograd.grad(act(x).sum(), x)
    return grad


def saturation_threshold(act: nn.Module) -> float:
    """|derivative| below this counts as saturated: ``SAT_FRACTION`` of the maximum on a fine grid."""
    return SAT_FRACTION * float(derivative(act, torch.linspace(*GRID)).abs().max())


class Diagnostics(pl.Callback):
    """Samples per-point percentiles and saturation (forward hooks on each block's layer and activation) and
    weight-gradient norms.

    Works with the module's manual optimization: Lightning calls ``on_after_backward`` after each
    ``manual_backward``. Values stay on the device until written, so sampling adds no host sync.
    """

    ARTIFACT = ARTIFACT

    def __init__(self, every: int = 50) -> None:
        self.every = int(check_range("train.diagnostics_every", every, 1))
        # (step, epoch, layer, point, (p15, p50, p85, sat) or None, grad norm or None)
        self.samples: list[tuple[int, int, str, str, torch.Tensor | None, torch.Tensor | None]] = []
        self._step = 0
        self._values: dict[tuple[str, str], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._weights: dict[str, torch.Tensor] = {}
        self._points: dict[str, tuple[str, ...]] = {}  # layer -> the points recorded for it

    @classmethod
    def from_config(cls, train: Mapping[str, Any]) -> Diagnostics | None:
        """The callback when ``train.diagnostics`` is on, else None."""
        return cls(train.get("diagnostics_every", 50)) if train.get("diagnostics") else None

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # every module, nested ones by dotted name (a residual block's ``res2.fc2``, a ResNet's ``stage1_block1.conv1``)
        children = dict(module.model.named_modules())
        for name, child in children.items():
            if not isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                continue
            self._weights[name] = child.weight
            act = children.get(f"{name}_act")  # models.BNNet names a block's activation <layer>_act
            if act is None:  # the logits layer: its gradient norm only
                self._points[name] = ("act_in",)
                continue
            self._points[name] = POINTS
            fn = copy.deepcopy(act)  # a hook-free copy: evaluating it must not re-enter the hooks below
            sat = (fn, saturation_threshold(fn))
            self._handles += [
                child.register_forward_pre_hook(partial(self._record_input, name, "linear_in", sat)),
                child.register_forward_hook(partial(self._record_output, name, "linear_out", sat)),
                act.register_forward_pre_hook(partial(self._record_input, name, "act_in", sat)),
            ]

    def _record_input(self, layer: str, point: str, sat: tuple[nn.Module, float], mod: nn.Module,
                      args: tuple[torch.Tensor, ...]) -> None:
        self._record(layer, point, sat, mod, args[0])

    def _record_output(self, layer: str, point: str, sat: tuple[nn.Module, float], mod: nn.Module,
                       args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._record(layer, point, sat, mod, output)

    def _record(self, layer: str, point: str, sat: tuple[nn.Module, float], mod: nn.Module,
                value: torch.Tensor) -> None:
        if mod.training and self._step % self.every == 0:
            x = value.detach().flatten().float()
            if x.numel() > MAX_VALUES:
                x = x[:: x.numel() // MAX_VALUES + 1]
            fn, threshold = sat
            saturated = (derivative(fn, x).abs() < threshold).float().mean()
            self._values[layer, point] = torch.cat([torch.quantile(x, x.new_tensor(QUANTILES)), saturated.view(1)])

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._step % self.every == 0:
            epoch = trainer.current_epoch + 1
            for layer, w in self._weights.items():
                norm = torch.linalg.vector_norm(w.grad.detach()) if w.grad is not None else None
                for point in self._points[layer]:
                    self.samples.append((self._step, epoch, layer, point, self._values.pop((layer, point), None),
                                         norm))
            self._values.clear()
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
        for step, epoch, layer, point, q, norm in self.samples:
            p = [f"{v:.6g}" for v in q.tolist()] if q is not None else [""] * 4
            g = "" if norm is None else f"{float(norm):.6g}"
            out.append(dict(zip(COLUMNS, (step, epoch, layer, point, *p, g), strict=True)))
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows())
        return buf.getvalue()


def read_csv(text: str) -> list[dict[str, Any]]:
    """Rows of a ``diagnostics.csv``: ``layer`` and ``point`` as strings, numbers as floats, a missing value as NaN.

    Files written before the named points (no ``point`` or ``sat`` column) read as ``act_in`` rows with NaN ``sat``.
    """
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        row = {k: (v if k in ("layer", "point") else float(v) if v != "" else float("nan")) for k, v in r.items()}
        rows.append({"point": "act_in", "sat": float("nan"), **row})
    return rows
