"""A trained model as one self-contained file: weights plus what rebuilds the architecture.

Every completed run logs it as the MLflow artifact ``model.pt``; ``bnsweep export`` and the
report read it back without Hydra or the dataset.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnsweep.errors import ConfigError
from bnsweep.training.models import CNN, MLP
from bnsweep.training.resnet import ResNet

FORMAT = "bnsweep-model/1"
ARTIFACT = "model.pt"
# Files written before the models moved into bnsweep.training name their old place.
MOVED = {"bnsweep.models.MLP": "bnsweep.training.models.MLP", "bnsweep.models.CNN": "bnsweep.training.models.CNN"}
# The only classes a model file may name: a checkpoint can come from anyone who can log an MLflow
# artifact, so its `_target_` is looked up here, never imported or Hydra-instantiated.
MODELS: dict[str, type[nn.Module]] = {"bnsweep.training.models.MLP": MLP, "bnsweep.training.models.CNN": CNN,
                                      "bnsweep.training.resnet.ResNet": ResNet}
# Hydra's own keys in a model config node: how to build it, not arguments of the model.
HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_")


class CheckpointError(ConfigError):
    """A model file names something other than our own model classes (refused, never run)."""


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain data; a nested ``_target_`` (something to build or call) is refused."""
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str) or k.startswith("_"):
                raise CheckpointError(f"{where}.{k}: a model file may hold only plain values, not {k!r} "
                                      "(refused: it could run code)")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"{where}: a model file may hold only plain values, not {type(value).__name__}")


def build_model(model_cfg: Mapping[str, Any], in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Our model class named by ``model_cfg["_target_"]``, called with the node's plain keys (no Hydra)."""
    target = model_cfg.get("_target_")
    target = MOVED.get(target, target)
    if target not in MODELS:
        raise CheckpointError(f"model._target_={target!r} is not allowed in a model file; allowed: "
                              f"{', '.join(MODELS)}")
    kwargs = _plain({k: v for k, v in model_cfg.items() if k not in HYDRA_KEYS}, "model")
    try:
        return MODELS[target](in_shape=tuple(in_shape), num_classes=int(num_classes), **kwargs)
    except TypeError as e:  # an unknown or missing argument
        raise CheckpointError(f"model: {e}") from None


def to_bytes(model: nn.Module, model_cfg: Mapping[str, Any], in_shape: Sequence[int], num_classes: int,
             config: Mapping[str, Any] | None = None) -> bytes:
    """Serialize weights (on the CPU), the resolved ``model`` config node and the data shapes."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "model": dict(model_cfg), "in_shape": list(in_shape),
                "num_classes": int(num_classes), "config": dict(config or {}),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, buffer)
    return buffer.getvalue()


def load(source: str | Path | bytes) -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode, and the checkpoint's metadata (model config, in_shape, num_classes, config)."""
    data = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                      weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{source if not isinstance(source, bytes) else 'checkpoint'} is not a bnsweep "
                         f"model file (expected format {FORMAT})")
    model = build_model(dict(data["model"]), data["in_shape"], data["num_classes"])
    model.load_state_dict(data.pop("state_dict"))
    return model.eval(), data
