"""A small CIFAR-style ResNet (He et al. 2016, section 4.2) whose normalization is ``model.norm``.

depth = 6n + 2: a 3x3 stem conv, three stages of n basic blocks (widths w, 2w, 4w; the second and third
stage halve the spatial size in their first block), global average pooling, [dense blocks], logits.
A basic block is conv-norm-act-conv-norm, plus the input, then the activation (``before_act``; with
``after_act`` each norm follows its activation instead). Where a block changes width or size, the skip is
a 1x1 conv with its own norm (option B); elsewhere it is the identity. Input channels and size come from
the data (1x28x28 Fashion-MNIST/MNIST, 3x32x32 CIFAR-10).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bnsweep.errors import ConfigError, check_bool, check_int
from bnsweep.training.models import BNNet, init_layer, make_activation


class BasicBlock(nn.Module):
    """Two 3x3 convs with a skip; submodules named as models.BNNet's blocks (conv1, conv1_bn, conv1_act, ...)."""

    def __init__(self, net: BNNet, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        body = nn.Sequential()
        net._block("conv1", nn.Conv2d(c_in, c_out, 3, stride, 1, bias=net.hidden_bias), c_out, True, into=body)
        self.conv1, self.conv2 = body.conv1, nn.Conv2d(c_out, c_out, 3, 1, 1, bias=net.hidden_bias)
        for name in ("conv1_bn", "conv1_act", "conv1_act_bn"):
            if hasattr(body, name):
                self.add_module(name, getattr(body, name))
        init_layer(self.conv2, net.init, net.init_std)
        where = f"a block's conv ({c_out} channels)"
        if net.placement == "before_act":
            self.conv2_bn = net._norm(c_out, True, where)
        if stride != 1 or c_in != c_out:
            normed = net.placement != "none"
            self.proj = nn.Conv2d(c_in, c_out, 1, stride, bias=not normed or net.norm_cfg["keep_bias"])
            init_layer(self.proj, net.init, net.init_std)
            if normed:
                self.proj_bn = net._norm(c_out, True, f"a block's 1x1 skip conv ({c_out} channels)")
        self.conv2_act = make_activation(net.activation, net.act_args)
        if net.placement == "after_act":
            self.conv2_act_bn = net._norm(c_out, True, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        for name in ("conv1_bn", "conv1_act", "conv1_act_bn"):
            h = getattr(self, name)(h) if hasattr(self, name) else h
        h = self.conv2(h)
        h = self.conv2_bn(h) if hasattr(self, "conv2_bn") else h
        skip = x
        if hasattr(self, "proj"):
            skip = self.proj(x)
            skip = self.proj_bn(skip) if hasattr(self, "proj_bn") else skip
        out = self.conv2_act(h + skip)
        return self.conv2_act_bn(out) if hasattr(self, "conv2_act_bn") else out


class ResNet(BNNet):
    """stem -> 3 stages of (depth - 2) / 6 basic blocks -> global average pool -> [dense blocks] -> logits."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, depth: int = 8, width: int = 16,
                 hidden: Sequence[int] = (), activation: str = "relu", act_args: Mapping[str, Any] | None = None,
                 init: str = "he_normal", init_std: float = 0.05, output_init: str = "glorot_uniform",
                 norm: Mapping[str, Any] | None = None, bn: Mapping[str, Any] | None = None,
                 residual: bool = True) -> None:
        super().__init__(activation, act_args, init, init_std, output_init, norm, bn)
        if not check_bool("model.residual", residual):
            raise ConfigError("model.residual=false is not allowed with model=resnet (residual by construction); "
                              "allowed: true (a plain deep network is model=mlp model.depth=D)")
        check_int("model.depth", depth, 8)
        if (depth - 2) % 6:
            raise ConfigError(f"model.depth={depth} is not allowed with model=resnet; allowed: 6n+2 "
                              "(8, 14, 20, 26, ...)")
        check_int("model.width", width, 1)
        c = in_shape[0]
        self._input_norm(c, True)
        self._block("stem", nn.Conv2d(c, width, 3, 1, 1, bias=self.hidden_bias), width, True)
        c = width
        for stage, w in enumerate((width, 2 * width, 4 * width), 1):
            for i in range(1, (depth - 2) // 6 + 1):
                stride = 2 if stage > 1 and i == 1 else 1
                self.add_module(f"stage{stage}_block{i}", BasicBlock(self, c, w, stride))
                c = w
        self.add_module("pool", nn.AdaptiveAvgPool2d(1))
        self.add_module("flatten", nn.Flatten())
        self._dense_head(c, hidden, num_classes)
