"""K copies of one network as one module: every weight gets a leading member axis.

A population of K members (same architecture, own weights, own BN statistics, own learning rate)
runs one forward and one backward per step instead of K: Linear layers become batched matmuls
(``baddbmm``), Conv2d a grouped convolution, BN one ``batch_norm`` call over K x C channels (per
channel statistics are per member by construction). Members never mix: member k's output and
gradients depend only on member k's weights and inputs, so a member that diverges (NaN) cannot
disturb the others, and ``keep`` drops members without changing the survivors' numbers.

Activations travel in one of four layouts: ``shared`` (B, ...) when every member sees the same
batch, ``images`` (K, B, C, H, W) when each member has its own batch order, ``channels``
(B, K*C, H, W) between convolutions, and ``features`` (K, B, F) between Linear layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnsweep.errors import ConfigError
from bnsweep.training.bn_eval import Walk
from bnsweep.training.models import Residual
from bnsweep.training.norms import (
    BatchRenorm1d,
    BatchRenorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    batch_renorm,
    ghost_batch_norm,
    renorm_limits,
)
from bnsweep.training.resnet import BasicBlock

Act = tuple[torch.Tensor, str]  # (tensor, layout)


def _stack(modules: Sequence[nn.Module], name: str) -> nn.Parameter | None:
    tensors = [getattr(m, name) for m in modules]
    if tensors[0] is None:
        return None
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).contiguous())


def _channels(x: torch.Tensor, layout: str, k: int) -> torch.Tensor:
    """Images as (B, K*C, H, W), member-major along channels."""
    if layout == "shared":
        return x.repeat(1, k, 1, 1)
    if layout == "images":
        return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])
    return x


class StackedLinear(nn.Module):
    """K Linear layers as one batched matmul. Weights are stored (K, in, out): ``x @ W`` then needs no
    transpose, and its weight gradient comes out contiguous (a transposed one costs a slow copy per step)."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach().t() for m in layers]).contiguous())
        self.bias = _stack(layers, "bias")  # (K, out)

    def forward(self, x: torch.Tensor, layout: str) -> Act:
        k = self.weight.shape[0]
        if layout == "shared":  # every member sees the same batch: a stride-0 view, no copy
            x = x.expand(k, *x.shape)
        if self.bias is None:
            return torch.bmm(x, self.weight), "features"
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight), "features"

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        state = {"weight": self.weight[i].t()}
        return state if self.bias is None else {**state, "bias": self.bias[i]}


class StackedConv2d(nn.Module):
    def __init__(self, layers: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        c = layers[0]
        if c.groups != 1 or c.padding_mode != "zeros" or isinstance(c.padding, str):
            raise ConfigError("population training supports Conv2d with zero padding and groups=1 only")
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.weight, self.bias = _stack(layers, "weight"), _stack(layers, "bias")  # (K, out, in, kh, kw)

    def forward(self, x: torch.Tensor, layout: str) -> Act:
        k = self.weight.shape[0]
        w = self.weight.reshape(-1, *self.weight.shape[2:])
        b = None if self.bias is None else self.bias.reshape(-1)
        groups = 1 if layout == "shared" else k  # a shared input needs no copies: one conv, K*out channels
        x = x if layout == "shared" else _channels(x, layout, k)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups), "channels"


class StackedBatchNorm(nn.Module):
    """K BatchNorms as one ``batch_norm`` over K*C channels: per-member batch and running statistics."""

    def __init__(self, layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__()
        bn = layers[0]
        if not (bn.track_running_stats and bn.momentum is not None):
            raise ConfigError("population training needs BN with running statistics and a momentum")
        self.eps, self.momentum, self.spatial = bn.eps, bn.momentum, isinstance(bn, nn.BatchNorm2d)
        self.weight, self.bias = _stack(layers, "weight"), _stack(layers, "bias")  # (K, C); None: affine=False
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, torch.stack([getattr(m, name) for m in layers]).clone())

    @property
    def shape(self) -> torch.Size:
        """(K, C): members and channels (from the running statistics: gamma/beta may be absent)."""
        return self.running_mean.shape

    def flat(self, name: str) -> torch.Tensor | None:
        """gamma or beta as (K*C,) for one ``batch_norm`` call; None without affine parameters."""
        t = getattr(self, name)
        return None if t is None else t.view(-1)

    def channels(self, x: torch.Tensor, layout: str) -> torch.Tensor:
        """The input as (B, K*C, ...), member-major: what one batch_norm call normalizes."""
        k, c = self.shape
        if self.spatial:
            return _channels(x, layout, k)
        if layout == "shared":
            return x.repeat(1, k)
        return x.transpose(0, 1).reshape(x.shape[1], k * c)

    def forward(self, x: torch.Tensor, layout: str) -> Act:
        k, c = self.shape
        if not self.training and not self.spatial:  # running statistics: one op, straight to (K, B, C)
            scale = torch.rsqrt(self.running_var + self.eps)
            if self.weight is not None:
                scale = self.weight * scale
            shift = -self.running_mean * scale
            if self.bias is not None:
                shift = self.bias + shift
            return torch.addcmul(shift.unsqueeze(1), x.unsqueeze(0) if layout == "shared" else x,
                                 scale.unsqueeze(1)), "features"
        if self.training:
            self.num_batches_tracked += 1
        y = self.channels(x, layout)
        y = F.batch_norm(y, self.running_mean.view(-1), self.running_var.view(-1), self.flat("weight"),
                         self.flat("bias"), self.training, self.momentum, self.eps)
        if self.spatial:
            return y, "channels"
        # contiguous (K, B, C): what the next batched matmul (and its gradients) run fastest on
        return y.view(len(y), k, c).transpose(0, 1).contiguous(), "features"


class StackedGhostBatchNorm(StackedBatchNorm):
    """K ghost batch norms (norms.GhostBatchNorm*): each virtual batch's statistics per member, in one call."""

    def __init__(self, layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__(layers)
        self.virtual_batch = layers[0].virtual_batch

    def forward(self, x: torch.Tensor, layout: str) -> Act:
        if not self.training:
            return super().forward(x, layout)
        self.num_batches_tracked += 1
        y = ghost_batch_norm(self.channels(x, layout), self.running_mean.view(-1), self.running_var.view(-1),
                             self.flat("weight"), self.flat("bias"), self.virtual_batch, self.momentum, self.eps)
        return self._out(y)

    def _out(self, y: torch.Tensor) -> Act:
        k, c = self.shape
        if self.spatial:
            return y, "channels"
        return y.view(len(y), k, c).transpose(0, 1).contiguous(), "features"


class StackedBatchRenorm(StackedGhostBatchNorm):
    """K batch renorms (norms.BatchRenorm*): r, d per member and channel; r_max, d_max follow the shared step."""

    def __init__(self, layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        StackedBatchNorm.__init__(self, layers)
        self.rmax, self.dmax, self.warmup_steps = layers[0].rmax, layers[0].dmax, layers[0].warmup_steps

    def forward(self, x: torch.Tensor, layout: str) -> Act:
        if not self.training:
            return StackedBatchNorm.forward(self, x, layout)
        # every member has taken the same number of steps (members start together)
        r_max, d_max = renorm_limits(float(self.num_batches_tracked[0]), self.rmax, self.dmax, self.warmup_steps)
        self.num_batches_tracked += 1
        y = batch_renorm(self.channels(x, layout), self.running_mean.view(-1), self.running_var.view(-1),
                         self.flat("weight"), self.flat("bias"), r_max, d_max, self.momentum, self.eps)
        return self._out(y)


class StackedGroupNorm(nn.Module):
    """K GroupNorms (layer, group, instance) as one ``group_norm`` with K x G groups over K*C channels."""

    def __init__(self, layers: Sequence[nn.GroupNorm]) -> None:
        super().__init__()
        g = layers[0]
        self.groups, self.c, self.eps, self.k = g.num_groups, g.num_channels, g.eps, len(layers)  # k: StackedNet
        self.weight, self.bias = _stack(layers, "weight"), _stack(layers, "bias")  # (K, C); None: affine=False

    def forward(self, x: torch.Tensor, layout: str) -> Act:
        k = self.k
        spatial = layout in ("images", "channels") or (layout == "shared" and x.dim() == 4)
        if spatial:
            y = _channels(x, layout, k)
        else:
            y = x.repeat(1, k) if layout == "shared" else x.transpose(0, 1).reshape(x.shape[1], k * self.c)
        w = None if self.weight is None else self.weight.view(-1)
        b = None if self.bias is None else self.bias.view(-1)
        y = F.group_norm(y, k * self.groups, w, b, self.eps)
        if spatial:
            return y, "channels"
        return y.view(len(y), k, self.c).transpose(0, 1).contiguous(), "features"


class StackedFlatten(nn.Module):
    def forward(self, x: torch.Tensor, layout: str) -> Act:
        if layout == "shared":
            return x.flatten(1), "shared"
        if layout == "images":
            return x.flatten(2), "features"
        if layout == "channels":
            k = self.k
            return x.reshape(len(x), k, -1).transpose(0, 1), "features"
        return x, layout


class Elementwise(nn.Module):
    """An activation or pooling layer: the same module serves every member (no weights)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, layout: str) -> Act:
        return self.module(x), layout


STACKED = {nn.Linear: StackedLinear, nn.Conv2d: StackedConv2d, nn.BatchNorm1d: StackedBatchNorm,
           nn.BatchNorm2d: StackedBatchNorm, GhostBatchNorm1d: StackedGhostBatchNorm,
           GhostBatchNorm2d: StackedGhostBatchNorm, BatchRenorm1d: StackedBatchRenorm,
           BatchRenorm2d: StackedBatchRenorm, nn.GroupNorm: StackedGroupNorm}
ELEMENTWISE = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.MaxPool2d)


class StackedNet(nn.Module):
    """K members of one ``nn.Sequential`` (an MLP or CNN of models.py); logits come out as (K, B, classes).

    Built from K initialized single models, so member k starts exactly where that model would.
    """

    def __init__(self, models: Sequence[nn.Sequential]) -> None:
        super().__init__()
        self.k = len(models)
        self.names = [name for name, _ in models[0].named_children()]
        self.layers = nn.ModuleList()
        for name, first in models[0].named_children():
            group = [m.get_submodule(name) for m in models]
            if isinstance(first, nn.Flatten):
                layer: nn.Module = StackedFlatten()
            elif type(first) in STACKED:
                layer = STACKED[type(first)](group)
            elif isinstance(first, ELEMENTWISE):
                layer = Elementwise(first)
            elif isinstance(first, Residual):
                layer = StackedResidual(group)
            elif isinstance(first, BasicBlock):
                raise ConfigError("population training stacks MLPs (plain or residual) and CNNs; model=resnet is "
                                  "not allowed with it: run with population=1")
            else:
                raise ConfigError(f"population training cannot stack layer {name} ({type(first).__name__})")
            self.layers.append(layer)
        self._set_k()

    def _set_k(self) -> None:
        for layer in self.modules():
            if isinstance(layer, (StackedFlatten, StackedGroupNorm)):
                layer.k = self.k

    def forward(self, x: torch.Tensor, per_member: bool = False) -> torch.Tensor:
        """``x``: (B, ...) shared by all members, or (K, B, ...) with ``per_member``."""
        layout = "images" if per_member else "shared"
        for layer in self.layers:
            x, layout = layer(x, layout)
        return x

    @torch.no_grad()
    def keep(self, members: torch.Tensor | Sequence[int]) -> None:
        """Keep only these members (indices into the current K), in this order."""
        index = torch.as_tensor(members, dtype=torch.long, device=self.layers_device)
        for module in self.modules():
            for p in module.parameters(recurse=False):
                p.data = p.data.index_select(0, index).contiguous()
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, b.index_select(0, index).contiguous())
        self.k = len(index)
        self._set_k()

    @property
    def layers_device(self) -> torch.device:
        return next(self.parameters()).device

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s weights and BN statistics as the single model's ``state_dict``."""
        state = {}
        for name, layer in zip(self.names, self.layers, strict=True):
            own = layer.member_state(i) if hasattr(layer, "member_state") else {
                key: t[i] for key, t in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]}
            state |= {f"{name}.{key}": t.detach().clone().contiguous() for key, t in own.items()}
        return state


class StackedResidual(StackedNet):
    """K residual MLP blocks (models.Residual): x + block(x), the block's layers stacked as a StackedNet's."""

    def forward(self, x: torch.Tensor, layout: str) -> Act:
        y, inner = x, layout
        for layer in self.layers:
            y, inner = layer(y, inner)
        return y + x, "features"  # x: (K, B, F), or (B, F) shared by every member (broadcast)


# How precise BN (training/bn_eval.py) steps through a population: (tensor, layout) states, stacked BN layers;
# an input BN's input is the same for every member, so it is measured once for all.
WALK = Walk(layers=lambda net: list(net.layers), start=lambda x: (x, "shared"), step=lambda layer, s: layer(*s),
            channels=lambda bn, s: s[0] if s[1] == "shared" else bn.channels(*s),
            is_bn=lambda module: isinstance(module, StackedBatchNorm))
