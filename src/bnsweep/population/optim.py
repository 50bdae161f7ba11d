"""Per-member optimizers over stacked parameters: torch's SGD (momentum, Nesterov), Adam and RMSprop.

The same update rules as ``torch.optim`` (single-tensor implementations), written once for all K
members: every hyperparameter is shared except the learning rate, a (K,) tensor broadcast along
each parameter's member axis. For Adam and RMSprop the learning rate multiplies the normalized
step, so it cannot be folded into the gradient; here it never is, for any optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bnsweep.errors import ConfigError

KINDS = {"torch.optim.SGD": "sgd", "torch.optim.Adam": "adam", "torch.optim.RMSprop": "rmsprop"}
# Options of each optimizer that population training implements, and the defaults it requires of the rest.
SUPPORTED = {
    "sgd": {"lr", "momentum", "dampening", "weight_decay", "nesterov"},
    "adam": {"lr", "betas", "eps", "weight_decay"},
    "rmsprop": {"lr", "alpha", "eps", "weight_decay", "momentum"},
}
REQUIRED_DEFAULTS = {"amsgrad": False, "centered": False, "maximize": False, "capturable": False,
                     "differentiable": False, "foreach": None, "fused": None,
                     "decoupled_weight_decay": False}


def check_options(opt: Mapping[str, Any]) -> str:
    """The optimizer's kind; ConfigError naming an option population training does not implement."""
    kind = KINDS.get(opt.get("_target_"))
    if kind is None:
        raise ConfigError(f"optimizer._target_={opt.get('_target_')!r} is not allowed with population training; "
                          f"choose one of: {', '.join(KINDS)}")
    for key, value in opt.items():
        if key.startswith("_") or key in SUPPORTED[kind]:
            continue
        if key not in REQUIRED_DEFAULTS or value != REQUIRED_DEFAULTS[key]:
            raise ConfigError(f"optimizer.{key}={value!r} is not allowed with population training; "
                              f"{kind} supports: {', '.join(sorted(SUPPORTED[kind]))}")
    return kind


class StackedOptimizer:
    """One optimizer for all members: ``lr`` is a (K,) tensor, the other options are shared."""

    def __init__(self, params: Sequence[nn.Parameter], opt: Mapping[str, Any], lr: torch.Tensor) -> None:
        self.kind = check_options(opt)
        self.params = list(params)
        self.lr = lr.to(self.params[0].device, self.params[0].dtype)
        self.wd = float(opt.get("weight_decay", 0.0))
        self.momentum = float(opt.get("momentum", 0.0))
        self.dampening = float(opt.get("dampening", 0.0))
        self.nesterov = bool(opt.get("nesterov", False))
        self.betas = tuple(float(b) for b in opt.get("betas", (0.9, 0.999)))
        self.eps = float(opt.get("eps", 1e-8))
        self.alpha = float(opt.get("alpha", 0.99))
        self.step_count = 0
        self.state: dict[str, list[torch.Tensor]] = {}  # e.g. momentum_buffer: one tensor per parameter
        self._views()

    def _views(self) -> None:
        self.lrs = [self.lr.view(-1, *[1] * (p.dim() - 1)) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def keep(self, index: torch.Tensor) -> None:
        """Drop members: keep the state of these (the parameters themselves are cut by StackedNet.keep)."""
        index = index.to(self.lr.device)
        self.lr = self.lr.index_select(0, index)
        for name, tensors in self.state.items():
            self.state[name] = [t.index_select(0, index).contiguous() for t in tensors]
        self._views()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every member, as ``foreach`` ops over all parameters (few Python calls per step)."""
        self.step_count += 1
        grads = [p.grad for p in self.params]
        if self.wd:
            grads = torch._foreach_add(grads, self.params, alpha=self.wd)
        {"sgd": self._sgd, "adam": self._adam, "rmsprop": self._rmsprop}[self.kind](grads)

    def _sgd(self, grads: list[torch.Tensor]) -> None:
        if self.momentum:
            if "momentum_buffer" not in self.state:
                bufs = self.state["momentum_buffer"] = [g.clone() for g in grads]
            else:
                bufs = self.state["momentum_buffer"]
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, grads, alpha=1 - self.dampening)
            grads = torch._foreach_add(grads, bufs, alpha=self.momentum) if self.nesterov else bufs
        torch._foreach_addcmul_(self.params, grads, self.lrs, value=-1)

    def _adam(self, grads: list[torch.Tensor]) -> None:
        b1, b2 = self.betas
        if "exp_avg" not in self.state:
            self.state["exp_avg"] = [torch.zeros_like(p) for p in self.params]
            self.state["exp_avg_sq"] = [torch.zeros_like(p) for p in self.params]
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        bias1, bias2_sqrt = 1 - b1**self.step_count, (1 - b2**self.step_count) ** 0.5
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(m, denom)
        torch._foreach_mul_(update, self.lrs)
        torch._foreach_add_(self.params, update, alpha=-1 / bias1)

    def _rmsprop(self, grads: list[torch.Tensor]) -> None:
        if "square_avg" not in self.state:
            self.state["square_avg"] = [torch.zeros_like(p) for p in self.params]
            if self.momentum > 0:
                self.state["momentum_buffer"] = [torch.zeros_like(p) for p in self.params]
        sq = self.state["square_avg"]
        torch._foreach_mul_(sq, self.alpha)
        torch._foreach_addcmul_(sq, grads, grads, value=1 - self.alpha)
        avg = torch._foreach_sqrt(sq)
        torch._foreach_add_(avg, self.eps)
        if self.momentum > 0:
            bufs = self.state["momentum_buffer"]
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_addcdiv_(bufs, grads, avg)
            torch._foreach_addcmul_(self.params, bufs, self.lrs, value=-1)
        else:
            update = torch._foreach_div(grads, avg)
            torch._foreach_addcmul_(self.params, update, self.lrs, value=-1)
