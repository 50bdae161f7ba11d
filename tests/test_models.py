import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnsweep.errors import ConfigError
from bnsweep.training.models import ACTIVATIONS, CNN, INITS, MLP, init_layer, model_summary, param_counts

KERAS = {"bn": {"momentum": 0.01, "eps": 1e-3}}


def kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.children()]


@pytest.mark.parametrize("placement", ["none", "before_act", "after_act"])
@pytest.mark.parametrize("input_bn", [False, True])
def test_mlp_layer_order(placement: str, input_bn: bool) -> None:
    m = MLP((1, 28, 28), 10, hidden=[30, 20], bn={"placement": placement, "input": input_bn})
    block = {"none": ["Linear", "ReLU"], "before_act": ["Linear", "BatchNorm1d", "ReLU"],
             "after_act": ["Linear", "ReLU", "BatchNorm1d"]}[placement]
    expected = ["Flatten"] + (["BatchNorm1d"] if input_bn else []) + block * 2 + ["Linear"]
    assert kinds(m) == expected


@pytest.mark.parametrize("placement", ["none", "before_act", "after_act"])
@pytest.mark.parametrize("input_bn", [False, True])
def test_cnn_layer_order(placement: str, input_bn: bool) -> None:
    m = CNN((3, 32, 32), 10, channels=[4, 8], hidden=[16], bn={"placement": placement, "input": input_bn})
    conv = {"none": ["Conv2d", "ReLU"], "before_act": ["Conv2d", "BatchNorm2d", "ReLU"],
            "after_act": ["Conv2d", "ReLU", "BatchNorm2d"]}[placement]
    dense = [k.replace("Conv2d", "Linear").replace("2d", "1d") for k in conv]
    expected = (["BatchNorm2d"] if input_bn else []) + (conv + ["MaxPool2d"]) * 2 + ["Flatten"] + dense + ["Linear"]
    assert kinds(m) == expected
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert CNN((1, 28, 28), 10, bn={"placement": placement})(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("placement", ["none", "before_act", "after_act"])
def test_bias_dropped_exactly_where_bn_follows(placement: str) -> None:
    for m in (MLP((1, 28, 28), 10, hidden=[30, 20], bn={"placement": placement, "input": True}),
              CNN((1, 28, 28), 10, channels=[4], hidden=[8], bn={"placement": placement, "input": True})):
        layers = list(m.children())
        for layer, nxt in zip(layers, layers[1:] + [None], strict=True):
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                followed_by_bn = isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d))
                assert (layer.bias is None) == followed_by_bn, (placement, layer)


@pytest.mark.parametrize("placement", ["before_act", "after_act"])
def test_affine_false_builds_bn_without_gamma_beta(placement: str) -> None:
    for cls, kw in ((MLP, {"hidden": [30, 20]}), (CNN, {"channels": [4], "hidden": [8]})):
        on = cls((1, 28, 28), 10, bn={"placement": placement, "input": True}, **kw)
        off = cls((1, 28, 28), 10, bn={"placement": placement, "input": True, "affine": False}, **kw)
        bns = [m for m in off.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(bns) == len([m for m in on.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]) > 0
        assert all(not bn.affine and bn.weight is None and bn.bias is None for bn in bns)
        gone = sum(2 * bn.num_features for bn in bns)  # gamma and beta per channel
        assert param_counts(off)["params_trainable"] == param_counts(on)["params_trainable"] - gone
        assert param_counts(off)["params_non_trainable"] == param_counts(on)["params_non_trainable"]
        off.train()
        y = off(torch.randn(16, 1, 28, 28))
        assert y.shape == (16, 10)


@pytest.mark.parametrize("placement", ["none", "before_act", "after_act"])
def test_keep_bias_keeps_the_bias_before_bn(placement: str) -> None:
    for cls, kw in ((MLP, {"hidden": [30, 20]}), (CNN, {"channels": [4], "hidden": [8]})):
        dropped = cls((1, 28, 28), 10, bn={"placement": placement}, **kw)
        kept = cls((1, 28, 28), 10, bn={"placement": placement, "keep_bias": True}, **kw)
        hidden = [m for n, m in kept.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert all(m.bias is not None for m in hidden)
        extra = sum(m.bias.numel() for m in hidden[:-1]) if placement == "before_act" else 0  # not the logits layer
        assert param_counts(kept)["params_trainable"] == param_counts(dropped)["params_trainable"] + extra


def test_param_counts_match_keras_summary_of_seed_001() -> None:
    # Keras: Total 271,346 / Non-trainable 2,368 for Flatten-BN-Dense300-LReLU-BN-Dense100-LReLU-BN-Dense10.
    m = MLP((1, 28, 28), 10, activation="leaky_relu", bn={"placement": "after_act", "input": True})
    assert param_counts(m) == {"params_trainable": 268_978, "params_non_trainable": 2_368}
    assert param_counts(MLP((1, 28, 28), 10)) == {"params_trainable": 266_610, "params_non_trainable": 0}
    assert "non-trainable: 2,368" in model_summary(m, (1, 28, 28))


FORMULAS = {  # std of each init, written out independently of the code
    "he_normal": lambda fi, fo: math.sqrt(2 / fi),
    "he_uniform": lambda fi, fo: math.sqrt(6 / fi) / math.sqrt(3),
    "glorot_normal": lambda fi, fo: math.sqrt(2 / (fi + fo)),
    "glorot_uniform": lambda fi, fo: math.sqrt(6 / (fi + fo)) / math.sqrt(3),
    "lecun_normal": lambda fi, fo: math.sqrt(1 / fi),
    "normal": lambda fi, fo: 0.02,
    "torch_default": lambda fi, fo: 1 / math.sqrt(fi) / math.sqrt(3),
}


@pytest.mark.parametrize("init", INITS)
def test_init_empirical_std(init: str) -> None:
    assert set(FORMULAS) == set(INITS)
    torch.manual_seed(0)
    for fan_in, fan_out in [(800, 300), (300, 100)]:
        layer = nn.Linear(fan_in, fan_out)
        init_layer(layer, init, std=0.02)
        std = layer.weight.std().item()
        assert std == pytest.approx(FORMULAS[init](fan_in, fan_out), rel=0.03), init
        assert layer.weight.mean().abs().item() < 0.1 * std
        if init != "torch_default":
            assert torch.all(layer.bias == 0)
    conv = nn.Conv2d(16, 32, 3)  # fan_in = 16*9, fan_out = 32*9
    init_layer(conv, init, std=0.02)
    assert conv.weight.std().item() == pytest.approx(FORMULAS[init](144, 288), rel=0.05)


def test_model_init_keys_reach_the_layers() -> None:
    torch.manual_seed(0)
    m = MLP((1, 28, 28), 10, hidden=[500], init="normal", init_std=0.1, output_init="glorot_uniform")
    assert m.fc1.weight.std().item() == pytest.approx(0.1, rel=0.03)
    assert m.out.weight.abs().max().item() <= math.sqrt(6 / 510)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("placement", ["none", "before_act", "after_act"])
def test_every_activation_builds_and_trains(activation: str, placement: str) -> None:
    torch.manual_seed(0)
    m = MLP((1, 8, 8), 3, hidden=[32], activation=activation, bn={"placement": placement, "input": True})
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    first = F.cross_entropy(m(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    last = F.cross_entropy(m(x), y).item()
    assert math.isfinite(last) and last < first


def test_activation_arguments_are_used() -> None:
    m = MLP((1, 4, 4), 2, hidden=[8], activation="leaky_relu",
            act_args={"leaky_relu": {"negative_slope": 0.3}, "elu": {"alpha": 2.0}})
    assert m.fc1_act.negative_slope == 0.3
    with pytest.raises(ConfigError, match="model.act_args.leaky_relu"):
        MLP((1, 4, 4), 2, activation="leaky_relu", act_args={"leaky_relu": {"slope": 0.3}})


def test_bn_keys_reach_the_layers() -> None:
    m = MLP((1, 4, 4), 2, hidden=[8], bn={"placement": "before_act", "momentum": 0.2, "eps": 1e-4})
    assert (m.fc1_bn.momentum, m.fc1_bn.eps) == (0.2, 1e-4)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"bn": {"placement": "middle"}},
     "model.bn.placement='middle' is not allowed; choose one of: none, before_act, after_act"),
    ({"activation": "swish"}, "model.activation='swish'"),
    ({"init": "xavier"}, "model.init='xavier'"),
    ({"bn": {"momentum": 1.5}}, "model.bn.momentum=1.5"),
    ({"bn": {"moment": 0.1}}, "model.bn has unknown key"),
    ({"bn": {"affine": "no"}}, "model.bn.affine='no' is not allowed; it must be true or false"),
    ({"bn": {"keep_bias": 1}}, "model.bn.keep_bias=1 is not allowed"),
])
def test_bad_model_values(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        MLP((1, 28, 28), 10, **kwargs)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_too_many_cnn_blocks_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="model.channels"):
        CNN((1, 28, 28), 10, channels=[4] * 6)
