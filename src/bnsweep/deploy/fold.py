"""Fold every eval-mode BatchNorm into a neighbouring Linear/Conv: same logits, no BN layers.

In eval mode BN is a per-channel affine map ``y = a*x + c`` with ``a = gamma/sqrt(var + eps)`` and
``c = beta - a*mean``. before_act BN folds into the layer *before* it (scale its output units);
after_act and input BN fold into the layer *after* it (scale its input channels, move ``W c`` into
the bias). Two places need care, both handled exactly (formulas: docs/inference.md):

* max-pool between the BN and the next layer commutes with ``a*x + c`` only where ``a >= 0``; channels
  with ``a < 0`` are pooled sign-flipped (``SignedMaxPool2d``: ``max(-x)``), then scaled by ``|a|``.
* a zero-padded conv: the padded zeros never went through BN, so ``c`` cannot become a scalar
  bias. The input is shifted by ``c/a`` before the conv's zero padding (``ChannelShift``, one add on
  the conv's input); channels with ``a == 0`` (BN output constant ``c``) add their exact border-aware
  contribution as a per-position bias map (``AddBiasMap``, needs ``in_shape``).

Anything else an affine map cannot pass (a nonlinearity right after input-side BN) keeps the map as
one exact ``ChannelAffine`` op. The math runs in float64 and is stored in the model's dtype.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnsweep.errors import ConfigError
from bnsweep.training.norms import kind_of

Affine = tuple[torch.Tensor, torch.Tensor]  # (a, c) per channel, float64


class ChannelShift(nn.Module):
    """x + shift per channel (dim 1): BN's offset, moved in front of a zero-padded conv."""

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


class ChannelAffine(nn.Module):
    """x * scale + shift per channel (dim 1): a BN map that nothing downstream can absorb."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class SignedMaxPool2d(nn.MaxPool2d):
    """max-pool of ``sign * x`` per channel: max(a*x) = |a| * max(sign(a) * x) for any sign of a."""

    def __init__(self, pool: nn.MaxPool2d, sign: torch.Tensor) -> None:
        super().__init__(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                         pool.ceil_mode)
        self.register_buffer("sign", sign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.sign)


class AddBiasMap(nn.Module):
    """Adds a per-position bias (C, H, W): a constant channel's exact path through a zero-padded conv."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> Affine:
    """The eval-mode map of one BN as (a, c) in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} has no running statistics (track_running_stats=False): it normalizes with "
                         "batch statistics even in eval mode and cannot be folded")
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + bn.eps)
    return a, beta - a * mean


def _input_shapes(model: nn.Sequential, in_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Each child's input shape (without batch), from one eval-mode pass on zeros."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: shapes.__setitem__(n, tuple(args[0].shape[1:])))
             for n, m in model.named_children()]
    try:
        with torch.no_grad():
            p = next(model.parameters())
            copy.deepcopy(model).eval()(torch.zeros(1, *in_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _fold_output(layer: nn.Linear | nn.Conv2d, a: torch.Tensor, c: torch.Tensor) -> nn.Module:
    """BN(layer(x)) as one layer: W' = a*W per output unit, b' = a*b + c."""
    new = _with_bias(layer)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    with torch.no_grad():
        dtype = layer.weight.dtype
        new.weight.copy_((layer.weight.double() * a.view(shape)).to(dtype))
        b = layer.bias.double() if layer.bias is not None else torch.zeros_like(a)
        new.bias.copy_((a * b + c).to(dtype))
    return new


def _with_bias(layer: nn.Linear | nn.Conv2d) -> nn.Linear | nn.Conv2d:
    new = copy.deepcopy(layer)
    if new.bias is None:
        new.bias = nn.Parameter(torch.zeros(new.weight.shape[0], dtype=new.weight.dtype,
                                            device=new.weight.device))
    return new


def _fold_linear_input(layer: nn.Linear, a: torch.Tensor, c: torch.Tensor) -> nn.Linear:
    """layer(a*x + c): W' = W*a over input features, b' = b + W c (a per channel: repeat per position)."""
    n = layer.in_features
    if n % a.numel():
        raise ValueError(f"cannot fold a {a.numel()}-channel BN into {layer}: in_features is not a multiple")
    a, c = a.repeat_interleave(n // a.numel()), c.repeat_interleave(n // a.numel())  # flatten is channel-major
    new = _with_bias(layer)
    with torch.no_grad():
        w = layer.weight.double()
        new.weight.copy_((w * a).to(layer.weight.dtype))
        new.bias.copy_((new.bias.double() + w @ c).to(layer.weight.dtype))
    return new


def _fold_conv_input(name: str, conv: nn.Conv2d, a: torch.Tensor, c: torch.Tensor,
                     in_hw: tuple[int, ...] | None) -> list[tuple[str, nn.Module]]:
    """conv(a*x + c) exactly, minding the zero padding (see the module docstring)."""
    pad = conv.padding
    padded = pad == "same" if isinstance(pad, str) else any(p != 0 for p in pad)
    if conv.groups != 1 or (padded and conv.padding_mode != "zeros"):
        raise ValueError(f"{name}: folding BN into a conv with groups={conv.groups}, "
                         f"padding_mode={conv.padding_mode!r} is not supported")
    dtype, w = conv.weight.dtype, conv.weight.double()
    new = _with_bias(conv)
    before: list[tuple[str, nn.Module]] = []
    after: list[tuple[str, nn.Module]] = []
    bias = new.bias.double()
    if not padded:  # every tap sees a*x + c: W c moves into the bias
        bias = bias + w.sum(dim=(2, 3)) @ c
    else:  # a*x + c = a*(x + c/a); the conv pads zeros after the shift, as the original padded a*x + c
        zero = a == 0
        shift = torch.where(zero, 0.0, c / torch.where(zero, 1.0, a))
        if shift.any():
            before.append((f"{name}_shift", ChannelShift(shift.view(-1, 1, 1).to(dtype))))
        const = torch.where(zero, c, 0.0)
        if const.any():  # a == 0: the channel is the constant c inside and 0 at the border
            if in_hw is None:
                raise ValueError(f"{name}: a BN channel with gamma == 0 before a padded conv needs in_shape to "
                                 "fold exactly (its border contribution depends on the input size)")
            plane = const.view(1, -1, 1, 1).expand(1, -1, *in_hw)
            bias_map = F.conv2d(plane, w, None, conv.stride, conv.padding, conv.dilation)[0]
            after.append((f"{name}_bias_map", AddBiasMap(bias_map.to(dtype))))
    with torch.no_grad():
        new.weight.copy_((w * a.view(1, -1, 1, 1)).to(dtype))
        new.bias.copy_(bias.to(dtype))
    return [*before, (name, new), *after]


def fold_bn(model: nn.Sequential, in_shape: Sequence[int] | None = None) -> nn.Sequential:
    """A copy of ``model`` without BN whose outputs equal the eval-mode model's.

    ``model`` is a flat ``nn.Sequential`` (bnsweep's MLP/CNN). ``in_shape`` (C, H, W) is needed only
    for a gamma == 0 channel in front of a padded conv. The original is not modified.
    """
    check_foldable(model)
    shapes = _input_shapes(model, in_shape) if in_shape is not None else {}
    out: list[tuple[str, nn.Module]] = []
    pending: Affine | None = None  # the true tensor is a*t + c, t = the output of out[-1]
    pending_name, name = "", ""
    spatial = flattened = False  # is the pending map over (C, H, W) channels; did a Flatten follow it
    dtype = next(model.parameters()).dtype

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            if flattened:
                raise ValueError(f"cannot fold {pending_name}: its per-channel map is flattened and then "
                                 f"reaches {name!r}, which is not a Linear")
            view = (-1, 1, 1) if spatial else (-1,)
            out.append((f"{pending_name}_affine", ChannelAffine(*(v.view(view).to(dtype) for v in pending))))
            pending = None

    for name, mod in model.named_children():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            a, c = bn_affine(mod)
            if pending is None and out and isinstance(out[-1][1], (nn.Linear, nn.Conv2d)):
                out[-1] = (out[-1][0], _fold_output(out[-1][1], a, c))  # before_act: into the previous layer
            elif pending is None:
                pending, pending_name = (a, c), name
                spatial, flattened = isinstance(mod, nn.BatchNorm2d), False
            else:  # BN after BN: compose the maps
                pending = (a * pending[0], a * pending[1] + c)
        elif pending is not None and isinstance(mod, nn.Linear) and (flattened or not spatial):
            out.append((name, _fold_linear_input(mod, *pending)))
            pending = None
        elif pending is not None and isinstance(mod, nn.Conv2d):
            hw = shapes[name][1:] if name in shapes else None
            out.extend(_fold_conv_input(name, mod, *pending, hw))
            pending = None
        elif pending is not None and isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
            a, c = pending
            sign = torch.where(a < 0, -torch.ones_like(a), torch.ones_like(a))
            if (sign < 0).any():  # max(a*x) = |a| * max(sign*x): pool the flipped channels
                mod = SignedMaxPool2d(mod, sign.view(-1, 1, 1).to(dtype))
            out.append((name, copy.deepcopy(mod)))
            pending = (a.abs(), c)
        elif pending is not None and isinstance(mod, (nn.Flatten, nn.Identity, nn.Dropout)):
            flattened = flattened or (isinstance(mod, nn.Flatten) and spatial)
            out.append((name, copy.deepcopy(mod)))  # per-channel maps are expanded at the next Linear
        else:
            flush()
            out.append((name, copy.deepcopy(mod)))
    flush()
    for _, mod in out:  # blocks with a skip (residual MLP, ResNet): fold inside each
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mod.modules()):
            _fold_inside(mod)
    return nn.Sequential(OrderedDict(out)).eval()


def check_foldable(model: nn.Module) -> None:
    """ConfigError (one line) if a norm layer has no fixed eval-mode map: layer, group and instance norms."""
    for module in model.modules():
        kind = kind_of(module)
        if kind in ("layer", "group", "instance"):
            raise ConfigError(f"model.norm.kind={kind} cannot be folded: it normalizes each input by that input's "
                              "own statistics, so at inference it is no fixed affine map; folding is allowed for "
                              "batch, ghost_batch and batch_renorm (running statistics)")


@torch.no_grad()
def _fold_inside(block: nn.Module) -> None:
    """In place, inside a block with a skip: a ``<layer>_bn`` right after its Linear/Conv ``<layer>`` goes into
    that layer (block forwards call children by name); any other BN becomes its exact ``ChannelAffine``."""
    for module in list(block.modules()):
        children = dict(module.named_children())
        for name, child in children.items():
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            a, c = bn_affine(child)
            layer = children.get(name.removesuffix("_bn"))
            if name.endswith("_bn") and isinstance(layer, (nn.Linear, nn.Conv2d)):
                setattr(module, name.removesuffix("_bn"), _fold_output(layer, a, c))
                setattr(module, name, nn.Identity())
            else:
                view = (-1, 1, 1) if isinstance(child, nn.BatchNorm2d) else (-1,)
                dtype = child.running_mean.dtype
                setattr(module, name, ChannelAffine(a.view(view).to(dtype), c.view(view).to(dtype)))

