"""``optimizer.lr_scaling``: the learning rate a run trains with, from the one a search proposes.

Cells at different batch sizes then share one LR search range: ``optimizer.lr`` is the rate at
``optimizer.reference_batch``, and a run at batch size B trains with lr x B/reference (``linear``,
Goyal et al. 2017), lr x sqrt(B/reference) (``sqrt``, Krizhevsky 2014; Hoffer et al. 2017) or lr
(``none``). Every optimizer is built here, for single runs and populations alike, so the rule has one place.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bnsweep.config import instantiate
from bnsweep.errors import check_choice, check_int

SCALINGS = ("none", "linear", "sqrt")
KEYS = ("lr_scaling", "reference_batch")  # ours, not the torch optimizer's: never passed to it


def factor(scaling: str, batch_size: int, reference_batch: int) -> float:
    """What ``optimizer.lr`` is multiplied by at this batch size."""
    ratio = batch_size / reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


def check(cfg: DictConfig) -> None:
    """One ``error:`` line for a bad ``optimizer.lr_scaling`` or ``optimizer.reference_batch``."""
    check_choice("optimizer.lr_scaling", cfg.optimizer.get("lr_scaling", "none"), SCALINGS)
    check_int("optimizer.reference_batch", cfg.optimizer.get("reference_batch", 32), 1)


def effective_lr(cfg: DictConfig) -> float:
    """The learning rate this run trains with (logged as the run's ``lr_effective`` param)."""
    opt = cfg.optimizer
    return float(opt.lr) * factor(str(opt.get("lr_scaling", "none")), int(cfg.data.batch_size),
                                  int(opt.get("reference_batch", 32)))


def optimizer_options(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.optimizer`` as the torch optimizer takes it: the effective lr, without our scaling keys."""
    opt = OmegaConf.to_container(cfg.optimizer, resolve=True)
    return {**{k: v for k, v in opt.items() if k not in KEYS}, "lr": effective_lr(cfg)}


def make_optimizer(cfg: DictConfig) -> Any:
    """``params -> torch optimizer`` with the effective lr (a partial of ``optimizer._target_``)."""
    return instantiate(optimizer_options(cfg))
