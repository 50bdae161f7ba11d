"""``train.trainable``: which parameters train. ``norm_only`` trains only the normalization layers' γ and β
(Frankle et al. 2021, "Training BatchNorm and only BatchNorm"); ``no_norm_affine`` freezes γ and β at their
initial 1 and 0 and trains everything else. Frozen parameters keep ``requires_grad=False`` and stay out of the
optimizer; one rule for single runs and populations (``follow`` copies it onto the stacked network).
"""

from __future__ import annotations

from torch import nn

from bnsweep.errors import ConfigError, check_choice
from bnsweep.training.norms import kind_of

MODES = ("all", "norm_only", "no_norm_affine")


def is_norm(module: nn.Module) -> bool:
    """A normalization layer of any ``model.norm.kind``."""
    return kind_of(module) is not None


def norm_affine(model: nn.Module) -> list[nn.Parameter]:
    """The γ and β of every normalization layer (none where ``model.norm.affine=false``)."""
    return [p for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)]


def apply(model: nn.Module, mode: str) -> nn.Module:
    """Set ``requires_grad`` of ``model``'s parameters for ``train.trainable=mode``; returns the model."""
    check_choice("train.trainable", mode, MODES)
    norm = {id(p) for p in norm_affine(model)}
    if mode == "norm_only" and not norm:
        raise ConfigError("train.trainable=norm_only is not allowed with this model: it has no normalization "
                          "layer with γ/β to train; set model.norm.kind (not none) and model.norm.affine=true, "
                          "or use train.trainable=all")
    for p in model.parameters():
        p.requires_grad_(mode == "all" or (id(p) in norm) == (mode == "norm_only"))
    return model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates."""
    return [p for p in model.parameters() if p.requires_grad]


def follow(single: nn.Module, stacked: nn.Module) -> None:
    """Give a stacked network (population/layers.py) the member's ``requires_grad``, parameter by parameter:
    a stacked layer holds its single layer's parameters in the same order, each with a leading member axis."""
    ours, theirs = list(single.parameters()), list(stacked.parameters())
    if len(ours) != len(theirs) or any(a.numel() * len(b) != b.numel() for a, b in zip(ours, theirs, strict=False)):
        raise RuntimeError("train.trainable: the stacked network's parameters do not match the single model's")
    for a, b in zip(ours, theirs, strict=True):
        b.requires_grad_(a.requires_grad)
