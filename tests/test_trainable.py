"""optimizer.lr_scaling (the rate a run trains with) and train.trainable (which parameters train), for single runs
and populations alike."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_cfg

from bnsweep.config import instantiate
from bnsweep.errors import ConfigError
from bnsweep.population.loop import run_population
from bnsweep.training import lr_scaling, trainable
from bnsweep.training import run as run_module
from bnsweep.training.checks import validate
from bnsweep.training.run import build_model, run_training

SMALL = ("data.limit_train=256", "data.val_size=200", "data.eval_batch_size=200", "trainer.max_epochs=1",
         "trainer.accelerator=cpu", "train.eval_batch_sizes=[]", "model.hidden=[16]", "threads=1",
         "train.val_every=null", "train.precise_bn=false", "train.train_eval_size=0", "tracking.log_model=false")


@pytest.fixture(scope="module")
def dm():
    data = instantiate(make_cfg(*SMALL).data)
    data.setup("fit")
    return data


@pytest.mark.parametrize(("scaling", "batch", "factor"), [("none", 128, 1.0), ("linear", 128, 4.0),
                                                         ("sqrt", 128, 2.0), ("linear", 8, 0.25)])
def test_the_effective_lr_follows_the_batch_size(scaling: str, batch: int, factor: float) -> None:
    cfg = make_cfg("optimizer=momentum", "optimizer.lr=0.1", f"optimizer.lr_scaling={scaling}",
                   "optimizer.reference_batch=32", f"data.batch_size={batch}")
    assert lr_scaling.effective_lr(cfg) == pytest.approx(0.1 * factor)
    opt = lr_scaling.make_optimizer(cfg)([torch.nn.Parameter(torch.zeros(1))])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * factor) and opt.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(("override", "line"), [
    ("optimizer.lr_scaling=cubic", "optimizer.lr_scaling='cubic' is not allowed; choose one of: none, linear, sqrt"),
    ("optimizer.reference_batch=0", "optimizer.reference_batch=0 is not allowed"),
    ("train.trainable=gamma", "train.trainable='gamma' is not allowed; choose one of: all, norm_only, no_norm_affine"),
])
def test_bad_scaling_or_trainable_is_one_error_line(override: str, line: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(override))
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_norm_only_without_a_norm_with_gamma_beta_says_why() -> None:
    for override in ("model.norm.kind=none", "model.norm.affine=false"):
        with pytest.raises(ConfigError, match=r"^train.trainable=norm_only is not allowed with this model: it has "
                                              r"no normalization layer with γ/β"):
            validate(make_cfg("train.trainable=norm_only", "model.norm.kind=batch", override))
    validate(make_cfg("train.trainable=norm_only", "model.norm.kind=none", "model.norm.input=true"))  # input BN


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("mode", "kind"), [("norm_only", "batch"), ("no_norm_affine", "batch"),
                                            ("norm_only", "layer")])
def test_only_the_trainable_parameters_change_single_and_population(mode: str, kind: str, dm, monkeypatch) -> None:
    cfgs = [make_cfg(*SMALL, f"model.norm.kind={kind}", f"train.trainable={mode}", f"optimizer.lr={lr}",
                     "optimizer.lr_scaling=linear", "optimizer.reference_batch=16") for lr in (0.05, 0.2)]
    built: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []  # each single run's model and its init

    def keep(cfg, data):
        model = build_model(cfg, data)
        built.append((model, _params(model)))
        return model
    monkeypatch.setattr(run_module, "build_model", keep)
    dm.seed = 0
    singles = [run_training(cfg, datamodule=dm, track=False) for cfg in cfgs]
    model, start = built[0]
    norm = {f"{name}.{p}" for name, m in model.named_modules() if trainable.is_norm(m) for p in ("weight", "bias")}
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert norm and grads == (norm if mode == "norm_only" else set(start) - norm)
    for m, init in built:
        after = _params(m)
        assert {n for n in init if not torch.equal(init[n], after[n])} == grads  # every trainable one moved
    assert singles[0].metrics["params_trainable"] == sum(start[n].numel() for n in grads)
    population = run_population(cfgs, datamodule=dm, track=False)
    for member, single in zip(population, singles, strict=True):
        assert single.outcome == member.outcome == "completed"
        assert member.history[-1]["train_loss"] == pytest.approx(single.history[-1]["train_loss"], rel=1e-4)
        assert member.metrics["test_acc"] == pytest.approx(single.metrics["test_acc"], abs=1e-3)


def test_the_population_trains_at_the_effective_lr(dm) -> None:
    """Two members at 0.1 and 0.4 with linear scaling at batch 64 (reference 32) equal their single runs, and a
    run at 0.2 without scaling equals the one at 0.1 with it."""
    base = (*SMALL, "data.batch_size=64", "optimizer.reference_batch=32")
    scaled = [make_cfg(*base, "optimizer.lr_scaling=linear", f"optimizer.lr={lr}") for lr in (0.1, 0.4)]
    plain = make_cfg(*base, "optimizer.lr_scaling=none", "optimizer.lr=0.2")
    dm.seed = 0
    population = run_population(scaled, datamodule=dm, track=False)
    single = run_training(plain, datamodule=dm, track=False)
    loss = population[0].history[-1]["train_loss"]
    assert math.isfinite(loss) and loss == pytest.approx(single.history[-1]["train_loss"], rel=1e-4)
    assert population[1].history[-1]["train_loss"] != pytest.approx(loss, rel=1e-3)
