"""Which configs a population can train: checked when a sweep file is read, before any worker starts."""

from __future__ import annotations

from omegaconf import DictConfig

from bnsweep.errors import ConfigError
from bnsweep.population.optim import check_options
from bnsweep.training.lr_scaling import optimizer_options

AUTO = "auto"  # population=auto: each worker measures the fastest K on its machine (population/auto.py)


def population_value(value: str | int | None, key: str = "population") -> int | str | None:
    """A population size from the command line or a config: an integer >= 1, ``auto`` or None."""
    if value is None or value == AUTO:
        return value
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if k < 1 or str(k) != str(value).strip():
        raise ConfigError(f"{key}={value!r} is not allowed; it must be an integer >= 1 or auto")
    return k


def check(cfg: DictConfig) -> None:
    """ConfigError (one line) if this run's config cannot be trained as a population member."""
    if cfg.train.get("diagnostics"):
        raise ConfigError("train.diagnostics=true is not allowed with population training (its hooks watch one "
                          "network); run this sweep with population=1")
    if "ResNet" in str(cfg.model.get("_target_")):
        raise ConfigError("model=resnet is not allowed with population training, which stacks MLPs (plain or "
                          "residual) and CNNs layer by layer; run this sweep with population=1")
    if str(cfg.trainer.get("precision", "32-true")) not in ("32-true", "32"):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r} is not allowed with population training; "
                          "use 32-true")
    check_options(optimizer_options(cfg))
