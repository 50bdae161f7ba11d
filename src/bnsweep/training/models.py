"""MLPs and CNNs whose BN placement, activation and weight init are config keys.

A hidden block is ``layer -> [BN] -> activation -> [BN]``: ``before_act`` normalizes the
pre-activation (Ioffe & Szegedy), ``after_act`` the activation (the seeds' Keras code).
``bn.input`` adds BN on the raw input. A Linear/Conv directly followed by BN has no bias:
BN subtracts the mean, so the bias would be dead weight and BN's beta takes its place
(``bn.keep_bias=true`` keeps it anyway, to measure that claim). ``bn.affine=false`` builds every BN
without its learned gamma/beta (pure normalization), to measure what they add.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bnsweep.errors import ConfigError, check_bool, check_choice, check_range

PLACEMENTS = ("none", "before_act", "after_act")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
}
INITS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal", "normal",
         "torch_default")
BN_DEFAULTS = {"placement": "none", "input": False, "momentum": 0.01, "eps": 1e-3, "affine": True,
               "keep_bias": False}


def init_std(init: str, fan_in: int, fan_out: int, std: float = 0.05) -> float:
    """The standard deviation each init gives a weight tensor (torch_default: kaiming_uniform(a=√5))."""
    return {
        "he_normal": math.sqrt(2 / fan_in),
        "he_uniform": math.sqrt(2 / fan_in),
        "glorot_normal": math.sqrt(2 / (fan_in + fan_out)),
        "glorot_uniform": math.sqrt(2 / (fan_in + fan_out)),
        "lecun_normal": math.sqrt(1 / fan_in),
        "normal": std,
        "torch_default": math.sqrt(1 / (3 * fan_in)),
    }[init]


def init_layer(layer: nn.Linear | nn.Conv2d, init: str, std: float = 0.05) -> None:
    """Initialize weights by ``init`` and zero the bias (Keras's default), except torch_default."""
    if init == "torch_default":
        layer.reset_parameters()
        return
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    s = init_std(init, fan_in, fan_out, std)
    with torch.no_grad():
        if init.endswith("uniform"):
            layer.weight.uniform_(-s * math.sqrt(3), s * math.sqrt(3))
        else:
            layer.weight.normal_(0.0, s)
        if layer.bias is not None:
            layer.bias.zero_()


def make_activation(name: str, act_args: Mapping[str, Mapping[str, Any]] | None) -> nn.Module:
    args = dict((act_args or {}).get(name) or {})
    try:
        return ACTIVATIONS[name](**args)
    except TypeError as e:
        raise ConfigError(f"model.act_args.{name}={args} is not allowed for {name}: {e}") from e


class BNNet(nn.Sequential):
    """Shared builder: validation, hidden blocks and initialization for MLP and CNN."""

    def __init__(self, activation: str, act_args: Mapping[str, Any] | None, init: str,
                 init_std: float, output_init: str, bn: Mapping[str, Any] | None) -> None:
        super().__init__()
        self.bn_cfg = {**BN_DEFAULTS, **dict(bn or {})}
        unknown = set(self.bn_cfg) - set(BN_DEFAULTS)
        if unknown:
            raise ConfigError(f"model.bn has unknown key(s) {sorted(unknown)}; allowed: "
                              f"{', '.join(BN_DEFAULTS)}")
        self.placement = check_choice("model.bn.placement", self.bn_cfg["placement"], PLACEMENTS)
        check_range("model.bn.momentum", self.bn_cfg["momentum"], 0, 1, low_open=True)
        check_range("model.bn.eps", self.bn_cfg["eps"], 0, low_open=True)
        for key in ("affine", "keep_bias"):
            check_bool(f"model.bn.{key}", self.bn_cfg[key])
        self.activation = check_choice("model.activation", activation, ACTIVATIONS)
        self.init = check_choice("model.init", init, INITS)
        self.output_init = check_choice("model.output_init", output_init, INITS)
        self.init_std = check_range("model.init_std", init_std, 0, low_open=True)
        self.act_args = act_args

    def _bn(self, kind: type[nn.Module], width: int) -> nn.Module:
        return kind(width, eps=self.bn_cfg["eps"], momentum=self.bn_cfg["momentum"], affine=self.bn_cfg["affine"])

    def _block(self, tag: str, layer: nn.Module, width: int, bn_kind: type[nn.Module]) -> None:
        self.add_module(f"{tag}", layer)
        if self.placement == "before_act":
            self.add_module(f"{tag}_bn", self._bn(bn_kind, width))
        self.add_module(f"{tag}_act", make_activation(self.activation, self.act_args))
        if self.placement == "after_act":
            self.add_module(f"{tag}_act_bn", self._bn(bn_kind, width))
        init_layer(layer, self.init, self.init_std)

    def _output(self, in_features: int, num_classes: int) -> None:
        self.add_module("out", nn.Linear(in_features, num_classes))
        init_layer(self.out, self.output_init, self.init_std)

    @property
    def hidden_bias(self) -> bool:
        """Whether hidden Linear/Conv layers have a bias: not where BN follows, unless ``bn.keep_bias``."""
        return self.placement != "before_act" or self.bn_cfg["keep_bias"]


class MLP(BNNet):
    """Flatten -> [input BN] -> hidden blocks -> Linear logits (softmax lives in the loss)."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (300, 100),
                 activation: str = "relu", act_args: Mapping[str, Any] | None = None,
                 init: str = "he_normal", init_std: float = 0.05,
                 output_init: str = "glorot_uniform", bn: Mapping[str, Any] | None = None) -> None:
        super().__init__(activation, act_args, init, init_std, output_init, bn)
        for i, w in enumerate(hidden):
            check_range(f"model.hidden[{i}]", w, 1)
        width = math.prod(in_shape)
        self.add_module("flatten", nn.Flatten())
        if self.bn_cfg["input"]:
            self.add_module("input_bn", self._bn(nn.BatchNorm1d, width))
        for i, w in enumerate(hidden, 1):
            self._block(f"fc{i}", nn.Linear(width, w, bias=self.hidden_bias), w, nn.BatchNorm1d)
            width = w
        self._output(width, num_classes)


class CNN(BNNet):
    """[input BN] -> conv blocks (3x3 conv, BN/act, 2x2 max-pool) -> dense blocks -> logits.

    Works for 28x28x1 and 32x32x3 inputs; each block halves the spatial size.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (32, 64), hidden: Sequence[int] = (128,),
                 activation: str = "relu", act_args: Mapping[str, Any] | None = None,
                 init: str = "he_normal", init_std: float = 0.05,
                 output_init: str = "glorot_uniform", bn: Mapping[str, Any] | None = None) -> None:
        super().__init__(activation, act_args, init, init_std, output_init, bn)
        c, h, w = in_shape
        if h >> len(channels) < 1:
            raise ConfigError(f"model.channels={list(channels)}: {len(channels)} pooling blocks "
                              f"shrink a {h}x{w} input to nothing; use at most "
                              f"{int(math.log2(h))} blocks")
        if self.bn_cfg["input"]:
            self.add_module("input_bn", self._bn(nn.BatchNorm2d, c))
        for i, ch in enumerate(channels, 1):
            check_range(f"model.channels[{i - 1}]", ch, 1)
            conv = nn.Conv2d(c, ch, 3, padding=1, bias=self.hidden_bias)
            self._block(f"conv{i}", conv, ch, nn.BatchNorm2d)
            self.add_module(f"conv{i}_pool", nn.MaxPool2d(2))
            c, h, w = ch, h // 2, w // 2
        self.add_module("flatten", nn.Flatten())
        width = c * h * w
        for i, hw in enumerate(hidden, 1):
            check_range(f"model.hidden[{i - 1}]", hw, 1)
            self._block(f"fc{i}", nn.Linear(width, hw, bias=self.hidden_bias), hw, nn.BatchNorm1d)
            width = hw
        self._output(width, num_classes)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and non-trainable counts as Keras reports them (BN moving mean/var: non-trainable)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return {"params_trainable": trainable, "params_non_trainable": frozen + stats}


def model_summary(model: nn.Module, in_shape: Sequence[int]) -> str:
    """A Keras-style table: layer, output shape, trainable and non-trainable parameter counts."""
    rows, shapes = [], {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
             for n, m in model.named_children()]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *in_shape, device=next(model.parameters()).device))
    model.train(was_training)
    for h in hooks:
        h.remove()
    for name, mod in model.named_children():
        c = param_counts(mod)
        rows.append(f"{name:<14}{type(mod).__name__:<14}{str(shapes.get(name, '')):<16}"
                    f"{c['params_trainable']:>12,}{c['params_non_trainable']:>14,}")
    total = param_counts(model)
    head = f"{'layer':<14}{'type':<14}{'output':<16}{'trainable':>12}{'non-trainable':>14}"
    foot = (f"total: {sum(total.values()):,}  trainable: {total['params_trainable']:,}  "
            f"non-trainable: {total['params_non_trainable']:,}")
    return "\n".join([head, "-" * len(head), *rows, "-" * len(head), foot])
