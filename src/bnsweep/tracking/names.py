"""MLflow run names: short and distinct where they are listed together."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Short and distinct where they are listed together: a sweep's cell runs by their grid values, a cell's trial
# runs (nested under it) by what they trained with. The trial's own number is in its tags (optuna.trial).
RUN_NAME_TAG = "mlflow.runName"


def cell_run_name(labels: Iterable[str]) -> str:
    """A cell's parent run: its grid values' labels joined by ' · ' ('before_act · relu'); 'all' without a grid."""
    return " · ".join(str(v) for v in labels) or "all"


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def trial_run_name(params: Mapping[str, Any], seed: int | None = None, repeat: int | None = None,
                   retry: bool = False) -> str:
    """A trial's run: its searched parameters by the last part of their keys and its training seed,
    'lr 0.0316 · seed 1003'; a repeat at the best LR 'repeat 3 · lr 0.1 · seed 3'; a retry of a lost
    trial ends with ' · retry' (the lost one's run keeps the name without it)."""
    parts = [f"repeat {repeat}"] if repeat else []
    parts += [f"{k.rsplit('.', 1)[-1]} {_param_text(v)}" for k, v in params.items()]
    parts += [f"seed {seed}"] if seed is not None else []
    parts += ["retry"] if retry else []
    return " · ".join(parts) or "trial"
