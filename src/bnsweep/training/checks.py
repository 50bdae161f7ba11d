"""Whole-config validation before any data is loaded: a typo fails in milliseconds, not after the data."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

from bnsweep.config import instantiate
from bnsweep.errors import ConfigError, check_bool, check_choice, check_int, check_range
from bnsweep.training import lr_scaling, trainable
from bnsweep.training.data import DATASETS

OPTIMIZERS = {"torch.optim.SGD": "sgd/momentum/nesterov", "torch.optim.Adam": "adam",
              "torch.optim.RMSprop": "rmsprop"}


def validate(cfg: DictConfig) -> None:
    """Check every key a run uses; raise ConfigError naming the key, value and what is allowed.

    The constructors hold the rules (one place each); this builds them cheaply on the CPU so a
    typo fails in milliseconds, not after the data has loaded.
    """
    check_types(cfg)
    dm = instantiate(cfg.data)
    spec = DATASETS[check_choice("data.name", dm.name, DATASETS)]
    model = instantiate(cfg.model, in_shape=spec.shape, num_classes=spec.num_classes)
    check_norm(model.norm_cfg, cfg)
    opt = cfg.optimizer
    check_choice("optimizer._target_", opt.get("_target_"), OPTIMIZERS)
    check_range("optimizer.lr", opt.get("lr"), 0, low_open=True)
    check_range("optimizer.weight_decay", opt.get("weight_decay", 0.0), 0)
    check_range("optimizer.momentum", opt.get("momentum", 0.0), 0, 1, high_open=True)
    lr_scaling.check(cfg)
    trainable.apply(model, cfg.train.get("trainable", "all"))
    try:
        lr_scaling.make_optimizer(cfg)(trainable.trainable(model))
    except ValueError as e:  # torch's own checks, e.g. nesterov without momentum
        raise ConfigError(f"optimizer: {e}") from None
    check_int("trainer.max_epochs", cfg.trainer.max_epochs, 1)
    check_range("train.target_acc", cfg.train.target_acc, 0, 1, low_open=True)
    check_range("train.max_loss", cfg.train.max_loss, 0, low_open=True)
    check_val_every(cfg.train.get("val_every"))
    if cfg.train.get("train_eval_size") is not None:  # null, like 0: no train_acc_eval
        check_int("train.train_eval_size", cfg.train.train_eval_size, 0)
    for size in cfg.train.get("eval_batch_sizes") or ():
        check_int("train.eval_batch_sizes", size, 1)
    if cfg.get("threads") is not None:
        check_int("threads", cfg.threads, 1)
    if cfg.tracking.get("flush_s") is not None:
        check_range("tracking.flush_s", cfg.tracking.flush_s, 0)


# Keys whose YAML value must be a real int / bool: Hydra passes `32.5` or `no` (a string) through
# unchanged, and a float batch size or a truthy "no" would fail late or silently do the wrong thing.
INT_KEYS = ("seed", "train.diagnostics_every", "data.batch_size", "data.eval_batch_size", "data.val_size",
            "data.chunk_steps", "trainer.max_epochs", "model.norm.virtual_batch", "model.norm.groups", "model.depth",
            "model.width")
BOOL_KEYS = ("train.precise_bn", "train.diagnostics", "data.standardize", "model.bn.input", "model.bn.affine",
             "model.bn.keep_bias", "model.norm.input", "model.norm.affine", "model.norm.keep_bias", "model.norm.sync",
             "model.residual", "tracking.log_model",
             "optimizer.nesterov")


def check_types(cfg: DictConfig) -> None:
    """Integers are integers and booleans booleans, for every such key of conf/ (one line naming the key)."""
    for key in (*INT_KEYS, "threads", "data.limit_train", *BOOL_KEYS):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:  # absent (e.g. optimizer.nesterov of Adam) or null: the constructor's default
            continue
        if key in BOOL_KEYS:
            check_bool(key, value)
        else:
            check_int(key, value, 0 if key == "seed" else 1)
    for group in ("hidden", "channels"):
        for i, width in enumerate(OmegaConf.select(cfg, f"model.{group}", default=None) or ()):
            check_int(f"model.{group}[{i}]", width, 1)


def check_norm(norm: dict, cfg: DictConfig) -> None:
    """The norm settings that depend on the data and trainer: ghost batches per device shard, sync under DDP."""
    devices = cfg.trainer.get("devices", 1)
    ddp = "ddp" in str(cfg.trainer.get("strategy", "auto")) and isinstance(devices, int) and devices > 1
    shard = cfg.data.batch_size // devices if ddp and cfg.data.batch_size % devices == 0 else cfg.data.batch_size
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if norm["sync"] and ddp and on_cpu:
        raise ConfigError("model.norm.sync=true is not allowed with trainer=ddp on CPU processes: torch's "
                          "SyncBatchNorm runs on GPUs only; allowed: GPUs (trainer.accelerator=gpu), or sync=false "
                          "(statistics per process)")
    if norm["kind"] == "ghost_batch" and shard % norm["virtual_batch"]:
        where = f"data.batch_size={cfg.data.batch_size}" + (f" (a shard of {shard} per device)" if ddp else "")
        raise ConfigError(f"model.norm.virtual_batch={norm['virtual_batch']} does not divide {where}; allowed: a "
                          f"divisor of the batch each device normalizes, e.g. {math.gcd(shard, norm['virtual_batch'])}")


def check_val_every(value: object) -> None:
    """train.val_every: optimizer steps between validation checks (an integer >= 1), or null: epoch ends only."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"train.val_every={value!r} is not allowed; it must be an integer >= 1 (optimizer "
                          "steps between validation checks) or null (validate only at each epoch's end)")
