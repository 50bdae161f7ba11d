"""The normalization layers a model's ``model.norm`` picks, and the one place the old ``model.bn`` maps in.

Kinds: ``batch`` (BatchNorm), ``ghost_batch`` (BN statistics per virtual batch of ``virtual_batch`` inputs,
Hoffer et al. 2017), ``batch_renorm`` (Ioffe 2017: batch statistics corrected towards the running ones by r, d
clipped to [1/rmax, rmax] and [-dmax, dmax]; rmax grows 1 -> rmax and dmax 0 -> dmax linearly over
``warmup_steps``), ``layer`` / ``group`` / ``instance`` (GroupNorm with 1, ``groups`` or one-per-channel groups:
statistics per input, no running statistics). The three batch kinds are ``_BatchNorm`` subclasses and use the
running statistics at inference, so precise statistics, small-batch evaluation and folding treat them as BN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bnsweep.errors import ConfigError, check_bool, check_choice, check_int, check_range

KINDS = ("none", "batch", "ghost_batch", "batch_renorm", "layer", "group", "instance")
BATCH_KINDS = ("batch", "ghost_batch", "batch_renorm")  # statistics over the batch; running statistics at inference
PLACEMENTS = ("before_act", "after_act")
LEGACY_PLACEMENTS = ("none", *PLACEMENTS)
# Constructor defaults for a model built without Hydra (tests, checkpoints); conf/model/mlp.yaml holds the same.
NORM_DEFAULTS: dict[str, Any] = {
    "kind": "none", "placement": "before_act", "input": False, "momentum": 0.01, "eps": 1e-3, "affine": True,
    "keep_bias": False, "sync": False, "virtual_batch": 16, "groups": 4, "rmax": 3.0, "dmax": 5.0,
    "warmup_steps": 2000}
LEGACY_KEYS = ("placement", "input", "momentum", "eps", "affine", "keep_bias")  # model.bn.*


def canonical(norm: Mapping[str, Any] | None, bn: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full ``model.norm`` settings, with any old ``model.bn.*`` key that is set (not null) mapped in.

    The one place the old form is read: ``bn.placement=none`` is ``kind=none``; ``bn.placement=before_act``
    (after_act) is ``kind=batch`` at that placement; the other ``bn.*`` keys are the ``norm.*`` keys of the
    same name. A ``bn`` key that contradicts a ``norm`` key set away from its default is refused.
    """
    out = {**NORM_DEFAULTS, **dict(norm or {})}
    unknown = set(out) - set(NORM_DEFAULTS)
    if unknown:
        raise ConfigError(f"model.norm has unknown key(s) {sorted(unknown)}; allowed: {', '.join(NORM_DEFAULTS)}")
    old = {k: v for k, v in dict(bn or {}).items() if v is not None}
    unknown = set(old) - set(LEGACY_KEYS)
    if unknown:
        raise ConfigError(f"model.bn has unknown key(s) {sorted(unknown)}; allowed: {', '.join(LEGACY_KEYS)} "
                          "(model.bn is the old form of model.norm)")
    if "placement" in old:
        placement = check_choice("model.bn.placement", old.pop("placement"), LEGACY_PLACEMENTS)
        kind = "none" if placement == "none" else "batch"
        if out["kind"] not in ("none", kind):
            raise ConfigError(f"model.bn.placement={placement} (the old form of model.norm.kind={kind}) contradicts "
                              f"model.norm.kind={out['kind']}; set model.norm.* only")
        out["kind"] = kind
        if placement != "none":
            old["placement"] = placement
    for key, value in old.items():
        if out[key] != NORM_DEFAULTS[key] and out[key] != value:
            raise ConfigError(f"model.bn.{key}={value!r} contradicts model.norm.{key}={out[key]!r}; "
                              f"set model.norm.{key} only")
        out[key] = value
    check_settings(out, {k: "model.bn" for k in old})
    return out


def legacy(norm: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical settings in the old ``model.bn`` form: placement none when kind=none (for old readers)."""
    return {**{k: norm[k] for k in LEGACY_KEYS}, "placement": "none" if norm["kind"] == "none" else norm["placement"]}


def check_settings(norm: Mapping[str, Any], old: Mapping[str, str] | None = None) -> None:
    """Each ``model.norm`` key within what it allows (model-independent rules); ``old`` names the keys that came
    from ``model.bn`` (an error names the key the researcher wrote)."""
    def key(name: str) -> str:
        return f"{(old or {}).get(name, 'model.norm')}.{name}"

    check_choice(key("kind"), norm["kind"], KINDS)
    check_choice(key("placement"), norm["placement"], PLACEMENTS)
    check_range(key("momentum"), norm["momentum"], 0, 1, low_open=True)
    check_range(key("eps"), norm["eps"], 0, low_open=True)
    for name in ("input", "affine", "keep_bias", "sync"):
        check_bool(key(name), norm[name])
    check_int(key("virtual_batch"), norm["virtual_batch"], 1)
    check_int(key("groups"), norm["groups"], 1)
    check_range(key("rmax"), norm["rmax"], 1)
    check_range(key("dmax"), norm["dmax"], 0)
    check_int(key("warmup_steps"), norm["warmup_steps"], 0)
    if norm["sync"] and norm["kind"] not in ("none", "batch"):
        why = ("its statistics are per virtual batch by design" if norm["kind"] == "ghost_batch" else
               "its r/d correction has no synchronized version here" if norm["kind"] == "batch_renorm" else
               "it has no batch statistics to synchronize")
        raise ConfigError(f"model.norm.sync=true is not allowed with model.norm.kind={norm['kind']}: {why}; "
                          "sync applies to kind=batch under trainer=ddp")


def _divisor_below(n: int, v: int) -> int:
    return max(d for d in range(1, min(n, v) + 1) if n % d == 0)


def make_norm(norm: Mapping[str, Any], width: int, spatial: bool, where: str, kind: str | None = None) -> nn.Module:
    """One normalization layer of ``kind`` (default ``norm['kind']``, not none) over ``width`` channels."""
    kind = kind or norm["kind"]
    eps, momentum, affine = norm["eps"], norm["momentum"], norm["affine"]
    if kind in BATCH_KINDS:
        cls = {"batch": (nn.BatchNorm1d, nn.BatchNorm2d), "ghost_batch": (GhostBatchNorm1d, GhostBatchNorm2d),
               "batch_renorm": (BatchRenorm1d, BatchRenorm2d)}[kind][spatial]
        layer = cls(width, eps=eps, momentum=momentum, affine=affine)
        if kind == "ghost_batch":
            layer.virtual_batch = norm["virtual_batch"]
        if kind == "batch_renorm":
            layer.rmax, layer.dmax, layer.warmup_steps = norm["rmax"], norm["dmax"], norm["warmup_steps"]
        return layer
    if kind == "instance" and not spatial:
        raise ConfigError(f"model.norm.kind=instance is not allowed on {where}: instance norm normalizes each "
                          "image channel over its pixels; allowed on conv layers (model=cnn, model=resnet)")
    groups = {"layer": 1, "group": norm["groups"], "instance": width}[kind]
    if width % groups:
        raise ConfigError(f"model.norm.groups={groups} does not divide the {width} channels of {where}; allowed: "
                          f"a divisor of every normalized width (e.g. {_divisor_below(width, groups)})")
    layer = nn.GroupNorm(groups, width, eps=eps, affine=affine)
    layer.norm_kind = kind  # group with groups == channels computes what instance does; the name says which was asked
    return layer


def kind_of(module: nn.Module) -> str | None:
    """The ``model.norm.kind`` a layer implements, or None if it is no normalization layer."""
    if isinstance(module, (GhostBatchNorm1d, GhostBatchNorm2d)):
        return "ghost_batch"
    if isinstance(module, (BatchRenorm1d, BatchRenorm2d)):
        return "batch_renorm"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch"
    if isinstance(module, nn.GroupNorm):
        groups = "layer" if module.num_groups == 1 else "instance" if module.num_groups == module.num_channels \
            else "group"
        return getattr(module, "norm_kind", groups)
    return None


# ---------------------------------------------------------------------- ghost batch norm


def ghost_batch_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, size: int, momentum: float,
                     eps: float) -> torch.Tensor:
    """Training-mode BN over each consecutive group of ``size`` inputs (x: (B, C, ...)); a last short group is
    its own. The running statistics take one momentum step per group, in order, as if each were a batch."""
    n = len(x)
    full = n - n % size
    parts, means, vars_ = [], [], []
    for start, count in ((0, full), (full, n - full)):
        if count == 0:
            continue
        g = x[start:start + count].reshape(count // min(size, count), min(size, count), *x.shape[1:])
        dims = [1, *range(3, g.dim())]
        mean = g.mean(dims, keepdim=True)
        var = (g - mean).square().mean(dims, keepdim=True)
        parts.append(((g - mean) * torch.rsqrt(var + eps)).reshape(count, *x.shape[1:]))
        m = g[0].numel() / g.shape[2]  # inputs per channel in one group
        means.append(mean.detach().reshape(len(g), -1))
        vars_.append(var.detach().reshape(len(g), -1) * (m / max(m - 1, 1)))  # unbiased, as BN's running_var
    y = torch.cat(parts) if len(parts) > 1 else parts[0]
    with torch.no_grad():
        mean_g, var_g = torch.cat(means), torch.cat(vars_)
        steps = len(mean_g)  # running <- (1-m)^G running + sum_i m (1-m)^(G-1-i) s_i
        w = momentum * (1 - momentum) ** torch.arange(steps - 1, -1, -1, dtype=x.dtype, device=x.device)
        keep = (1 - momentum) ** steps
        running_mean.mul_(keep).add_(w @ mean_g.to(x.dtype))
        running_var.mul_(keep).add_(w @ var_g.to(x.dtype))
    return _affine(y, weight, bias)


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return y
    shape = (1, -1, *([1] * (y.dim() - 2)))
    return torch.addcmul(bias.view(shape), y, weight.view(shape))


class _Ghost:
    virtual_batch = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked += 1
        return ghost_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.virtual_batch,
                                self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}"


class GhostBatchNorm1d(_Ghost, nn.BatchNorm1d):
    """BatchNorm1d whose training statistics come from each virtual batch of ``virtual_batch`` inputs."""


class GhostBatchNorm2d(_Ghost, nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from each virtual batch of ``virtual_batch`` images."""


# ---------------------------------------------------------------------- batch renormalization


def renorm_limits(step: float, rmax: float, dmax: float, warmup_steps: int) -> tuple[float, float]:
    """(r_max, d_max) at optimizer step ``step``: 1 -> rmax and 0 -> dmax linearly over ``warmup_steps``."""
    t = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    return 1.0 + (rmax - 1.0) * t, dmax * t


def batch_renorm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, r_max: float, d_max: float, momentum: float,
                 eps: float) -> torch.Tensor:
    """Training-mode batch renormalization (Ioffe 2017, Algorithm 1) over x: (B, C, ...).

    x_hat = (x - mu_B) / sigma_B * r + d with r = clip(sigma_B / sigma, 1/r_max, r_max) and
    d = clip((mu_B - mu) / sigma, -d_max, d_max), r and d treated as constants in the gradient.
    """
    dims = [0, *range(2, x.dim())]
    shape = (1, -1, *([1] * (x.dim() - 2)))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    std = torch.sqrt(var + eps)
    with torch.no_grad():
        running_std = torch.sqrt(running_var + eps).view(shape)
        r = (std / running_std).clamp(1 / r_max, r_max)
        d = ((mean - running_mean.view(shape)) / running_std).clamp(-d_max, d_max)
        n = x.numel() / x.shape[1]
        running_mean.lerp_(mean.view(-1), momentum)
        running_var.lerp_(var.view(-1) * (n / max(n - 1, 1)), momentum)
    y = (x - mean) / std * r + d
    return _affine(y, weight, bias)


class _Renorm:
    rmax, dmax, warmup_steps = 3.0, 5.0, 2000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        r_max, d_max = renorm_limits(float(self.num_batches_tracked), self.rmax, self.dmax, self.warmup_steps)
        self.num_batches_tracked += 1
        return batch_renorm(x, self.running_mean, self.running_var, self.weight, self.bias, r_max, d_max,
                            self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"


class BatchRenorm1d(_Renorm, nn.BatchNorm1d):
    """Batch renormalization over features (N, C)."""


class BatchRenorm2d(_Renorm, nn.BatchNorm2d):
    """Batch renormalization over image channels (N, C, H, W)."""
