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

from bnsweep.config import instantiate

FORMAT = "bnsweep-model/1"
ARTIFACT = "model.pt"
# Files written before the models moved into bnsweep.training name their old place.
MOVED = {"bnsweep.models.MLP": "bnsweep.training.models.MLP", "bnsweep.models.CNN": "bnsweep.training.models.CNN"}


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
    model_cfg = dict(data["model"])
    model_cfg["_target_"] = MOVED.get(model_cfg.get("_target_"), model_cfg.get("_target_"))
    model = instantiate(model_cfg, in_shape=tuple(data["in_shape"]), num_classes=data["num_classes"])
    model.load_state_dict(data.pop("state_dict"))
    return model.eval(), data
