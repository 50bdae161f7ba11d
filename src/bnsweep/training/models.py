"""MLPs and CNNs whose normalization (kind, placement), activation and weight init are config keys.

A hidden block is ``layer -> [norm] -> activation -> [norm]``: ``before_act`` normalizes the
pre-activation (Ioffe & Szegedy), ``after_act`` the activation (the seeds' Keras code). The norm layer
is ``model.norm.kind`` (norms.py; the old ``model.bn.*`` keys map to it there). ``norm.input`` adds a norm
on the raw input. A Linear/Conv directly followed by a norm has no bias: every kind subtracts a mean,
so the bias would be dead weight and beta takes its place (``norm.keep_bias=true`` keeps it anyway, to
measure that claim). ``norm.affine=false`` builds every norm without its learned gamma/beta (pure
normalization), to measure what they add. Norm layers keep the names ``<layer>_bn`` / ``<layer>_act_bn`` /
``input_bn`` whatever their kind, so checkpoints written before the kinds existed still load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bnsweep.errors import ConfigError, check_bool, check_choice, check_int, check_range
from bnsweep.training.norms import canonical, make_norm

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
                 init_std: float, output_init: str, norm: Mapping[str, Any] | None,
                 bn: Mapping[str, Any] | None) -> None:
        super().__init__()
        self.norm_cfg = canonical(norm, bn)
        self.kind = self.norm_cfg["kind"]
        self.placement = "none" if self.kind == "none" else self.norm_cfg["placement"]
        self.activation = check_choice("model.activation", activation, ACTIVATIONS)
        self.init = check_choice("model.init", init, INITS)
        self.output_init = check_choice("model.output_init", output_init, INITS)
        self.init_std = check_range("model.init_std", init_std, 0, low_open=True)
        self.act_args = act_args

    def _norm(self, width: int, spatial: bool, where: str, kind: str | None = None) -> nn.Module:
        return make_norm(self.norm_cfg, width, spatial, where, kind)

    def _input_norm(self, width: int, spatial: bool) -> None:
        """``norm.input``: the model's kind on the raw input (BatchNorm when kind=none, as bn.input was)."""
        if self.norm_cfg["input"]:
            kind = "batch" if self.kind == "none" else self.kind
            self.add_module("input_bn", self._norm(width, spatial, "the input (model.norm.input=true)", kind))

    def _block(self, tag: str, layer: nn.Module, width: int, spatial: bool, normed: bool = True,
               into: nn.Sequential | None = None) -> None:
        """layer -> [norm] -> act -> [norm], added to ``into`` (default: this network)."""
        into = self if into is None else into
        into.add_module(f"{tag}", layer)
        where = f"{tag} ({width} {'channels' if spatial else 'units'})"
        if normed and self.placement == "before_act":
            into.add_module(f"{tag}_bn", self._norm(width, spatial, where))
        into.add_module(f"{tag}_act", make_activation(self.activation, self.act_args))
        if normed and self.placement == "after_act":
            into.add_module(f"{tag}_act_bn", self._norm(width, spatial, where))
        init_layer(layer, self.init, self.init_std)

    def _output(self, in_features: int, num_classes: int) -> None:
        self.add_module("out", nn.Linear(in_features, num_classes))
        init_layer(self.out, self.output_init, self.init_std)

    def _dense_head(self, width: int, hidden: Sequence[int], num_classes: int) -> None:
        """A conv net's fully connected layers, then its output (instance norm has no dense form: none there)."""
        normed = self.kind != "instance"
        for i, hw in enumerate(hidden, 1):
            check_int(f"model.hidden[{i - 1}]", hw, 1)
            self._block(f"fc{i}", nn.Linear(width, hw, bias=self.hidden_bias or not normed), hw, False, normed=normed)
            width = hw
        self._output(width, num_classes)

    @property
    def hidden_bias(self) -> bool:
        """Whether hidden Linear/Conv layers have a bias: not where a norm follows (every kind subtracts a mean,
        so the bias is dead weight and beta takes its place), unless ``norm.keep_bias``."""
        return self.placement != "before_act" or self.norm_cfg["keep_bias"]


def hidden_widths(hidden: Sequence[int], depth: int | None, width: int | None) -> list[int]:
    """``model.depth``/``model.width`` as shorthand for ``model.hidden``: ``[width] * depth``; depth alone keeps
    hidden's first width, width alone keeps hidden's number of layers."""
    if depth is not None:
        check_int("model.depth", depth, 1)
    if width is not None:
        check_int("model.width", width, 1)
    if depth is None and width is None:
        return list(hidden)
    d = len(hidden) if depth is None else depth
    w = width if width is not None else (hidden[0] if hidden else 100)
    return [w] * d


class Residual(nn.Sequential):
    """x + block(x): an identity skip around one same-width MLP block (model.residual=true)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class MLP(BNNet):
    """Flatten -> [input norm] -> hidden blocks -> Linear logits (softmax lives in the loss).

    ``residual=true``: every hidden block whose width equals its input's is wrapped in an identity skip
    (``res{i}``: x + act(norm(fc(x)))); a block that changes the width (the first, from the input) has none.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (300, 100),
                 activation: str = "relu", act_args: Mapping[str, Any] | None = None,
                 init: str = "he_normal", init_std: float = 0.05,
                 output_init: str = "glorot_uniform", norm: Mapping[str, Any] | None = None,
                 bn: Mapping[str, Any] | None = None, depth: int | None = None, width: int | None = None,
                 residual: bool = False) -> None:
        super().__init__(activation, act_args, init, init_std, output_init, norm, bn)
        hidden = hidden_widths(hidden, depth, width)
        for i, w in enumerate(hidden):
            check_range(f"model.hidden[{i}]", w, 1)
        self.residual = check_bool("model.residual", residual)
        width = math.prod(in_shape)
        self.add_module("flatten", nn.Flatten())
        self._input_norm(width, False)
        for i, w in enumerate(hidden, 1):
            fc = nn.Linear(width, w, bias=self.hidden_bias)
            if residual and w == width:
                block = Residual()
                self._block(f"fc{i}", fc, w, False, into=block)
                self.add_module(f"res{i}", block)
            else:
                self._block(f"fc{i}", fc, w, False)
            width = w
        self._output(width, num_classes)


class CNN(BNNet):
    """[input norm] -> conv blocks (3x3 conv, norm/act, 2x2 max-pool) -> dense blocks -> logits.

    Works for 28x28x1 and 32x32x3 inputs; each block halves the spatial size. With kind=instance only the
    conv blocks are normalized (instance norm of a dense unit is a constant): dense blocks keep their bias.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (32, 64), hidden: Sequence[int] = (128,),
                 activation: str = "relu", act_args: Mapping[str, Any] | None = None,
                 init: str = "he_normal", init_std: float = 0.05,
                 output_init: str = "glorot_uniform", norm: Mapping[str, Any] | None = None,
                 bn: Mapping[str, Any] | None = None, depth: int | None = None, width: int | None = None,
                 residual: bool = False) -> None:
        super().__init__(activation, act_args, init, init_std, output_init, norm, bn)
        if check_bool("model.residual", residual):
            raise ConfigError("model.residual=true is not allowed with model=cnn; allowed with model=mlp "
                              "(the residual CNN is model=resnet)")
        hidden = hidden_widths(hidden, depth, width)
        c, h, w = in_shape
        if h >> len(channels) < 1:
            raise ConfigError(f"model.channels={list(channels)}: {len(channels)} pooling blocks "
                              f"shrink a {h}x{w} input to nothing; use at most "
                              f"{int(math.log2(h))} blocks")
        self._input_norm(c, True)
        for i, ch in enumerate(channels, 1):
            check_range(f"model.channels[{i - 1}]", ch, 1)
            conv = nn.Conv2d(c, ch, 3, padding=1, bias=self.hidden_bias)
            self._block(f"conv{i}", conv, ch, True)
            self.add_module(f"conv{i}_pool", nn.MaxPool2d(2))
            c, h, w = ch, h // 2, w // 2
        self.add_module("flatten", nn.Flatten())
        self._dense_head(c * h * w, hidden, num_classes)


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
