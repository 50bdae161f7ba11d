from itertools import product
from pathlib import Path

import pytest
from helpers import make_cfg

from bnsweep.defaults import CONF_DIR as CONF
from bnsweep.errors import ConfigError
from bnsweep.training.checks import validate

GROUPS = {g: sorted(p.stem for p in (Path(CONF) / g).glob("*.yaml"))
          for g in ("data", "model", "optimizer", "trainer", "tracking")}
EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def test_groups_are_what_the_docs_promise() -> None:
    assert GROUPS["data"] == ["cifar10", "fashion_mnist", "mnist"]
    assert GROUPS["model"] == ["cnn", "mlp", "resnet"]
    assert GROUPS["optimizer"] == ["adam", "momentum", "nesterov", "rmsprop", "sgd"]
    assert {"seed001_bn", "seed001_nobn", "seed002_bn"} <= set(EXPERIMENTS)


@pytest.mark.parametrize(("data", "model"), list(product(GROUPS["data"], GROUPS["model"])))
def test_every_data_model_pair_composes_and_validates(data: str, model: str) -> None:
    cfg = make_cfg(f"data={data}", f"model={model}")
    assert cfg.data.name == data
    validate(cfg)


@pytest.mark.parametrize("group", ["optimizer", "trainer", "tracking"])
def test_every_option_of_the_other_groups_composes_and_validates(group: str) -> None:
    for option in GROUPS[group]:
        validate(make_cfg(f"{group}={option}"))


def test_optimizer_options_map_to_torch() -> None:
    assert make_cfg("optimizer=nesterov").optimizer.nesterov is True
    assert make_cfg("optimizer=momentum").optimizer.momentum == 0.9
    assert make_cfg("optimizer=rmsprop").optimizer._target_ == "torch.optim.RMSprop"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    validate(make_cfg(f"experiment={experiment}"))


def test_seed_001_overlays_follow_the_seed_and_keras() -> None:
    nobn, bn = make_cfg("experiment=seed001_nobn"), make_cfg("experiment=seed001_bn")
    for cfg in (nobn, bn):
        assert cfg.data.name == "mnist" and list(cfg.model.hidden) == [300, 100]
        assert cfg.model.activation == "leaky_relu" and cfg.model.act_args.leaky_relu.negative_slope == 0.3
        assert cfg.model.init == "he_normal" and cfg.model.output_init == "glorot_uniform"
        assert cfg.optimizer.lr == 0.001 and cfg.optimizer._target_ == "torch.optim.SGD"
        assert cfg.data.batch_size == 32 and cfg.trainer.max_epochs == 10
    assert (nobn.model.bn.placement, nobn.model.bn.input) == ("none", False)
    assert (bn.model.bn.placement, bn.model.bn.input) == ("after_act", True)
    assert (bn.model.bn.momentum, bn.model.bn.eps) == (0.01, 0.001)


def test_seed_002_overlay() -> None:
    cfg = make_cfg("experiment=seed002_bn")
    assert cfg.data.name == "fashion_mnist" and cfg.model.activation == "relu"
    assert (cfg.model.bn.placement, cfg.model.bn.input) == ("after_act", True)


def test_cli_overrides_win_over_experiments() -> None:
    cfg = make_cfg("experiment=seed001_bn", "optimizer.lr=0.05", "model.bn.placement=before_act")
    assert cfg.optimizer.lr == 0.05 and cfg.model.bn.placement == "before_act"


@pytest.mark.parametrize(("override", "expected"), [
    ("model.bn.placement=middle",
     "model.bn.placement='middle' is not allowed; choose one of: none, before_act, after_act"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is not allowed; it must be a number in (0, inf)"),
    ("data.name=svhn", "data.name='svhn' is not allowed; choose one of: mnist, fashion_mnist, cifar10"),
    ("model.activation=swish", "model.activation='swish' is not allowed; choose one of: sigmoid, tanh, relu"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed"),
    ("train.target_acc=1.5", "train.target_acc=1.5 is not allowed; it must be a number in (0, 1]"),
    ("data.batch_size=0", "data.batch_size=0 is not allowed"),
    ("optimizer.momentum=1.2", "optimizer.momentum=1.2 is not allowed; it must be a number in [0, 1)"),
])
def test_bad_values_name_key_value_and_allowed(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(override))
    assert expected in str(e.value) and "\n" not in str(e.value)
