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
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]
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
        for state in self.state:
            for k, v in state.items():
                state[k] = v.index_select(0, index).contiguous()
        self._views()

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        update = {"sgd": self._sgd, "adam": self._adam, "rmsprop": self._rmsprop}[self.kind]
        for p, lr, state in zip(self.params, self.lrs, self.state, strict=True):
            if p.grad is None:
                continue
            g = p.grad if self.wd == 0 else p.grad.add(p, alpha=self.wd)
            update(p, g, lr, state)

    def _sgd(self, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.clone()
            else:
                buf.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
            g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
        p.addcmul_(g, lr, value=-1)

    def _adam(self, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        b1, b2 = self.betas
        if not state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1, bias2_sqrt = 1 - b1**self.step_count, (1 - b2**self.step_count) ** 0.5
        denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
        p.sub_(m.div(denom).mul_(lr / bias1))

    def _rmsprop(self, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if not state:
            state["square_avg"] = torch.zeros_like(p)
            if self.momentum > 0:
                state["momentum_buffer"] = torch.zeros_like(p)
        sq = state["square_avg"]
        sq.mul_(self.alpha).addcmul_(g, g, value=1 - self.alpha)
        avg = sq.sqrt().add_(self.eps)
        if self.momentum > 0:
            buf = state["momentum_buffer"]
            buf.mul_(self.momentum).addcdiv_(g, avg)
            p.addcmul_(buf, lr, value=-1)
        else:
            p.sub_(g.div(avg).mul_(lr))
