"""Configs: composing them from the package's ``conf/`` and ``instantiate`` with readable errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from bnsweep.defaults import CONF_DIR
from bnsweep.errors import BnsweepError, ConfigError


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """A config with ``overrides``, inside a Hydra app (its search path) or outside one (``conf/``)."""
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising our own one-line errors instead of Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, BnsweepError):
            raise cause from None
        raise ConfigError(str(e).splitlines()[0]) from e
