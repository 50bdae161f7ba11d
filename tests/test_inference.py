"""BN at inference: population statistics and small-batch statistics, checked against direct math."""

import pytest
import torch
from torch import nn

from bnsweep.training.bn_eval import eval_modes, loss_and_accuracy, precise_bn, with_group_stats
from bnsweep.training.models import CNN, MLP


def mlp(placement: str, bn_input: bool = False) -> MLP:
    torch.manual_seed(0)
    return MLP((1, 6, 6), 5, hidden=[7, 4], activation="tanh", act_args=None, init="he_normal", init_std=0.05,
               output_init="glorot_uniform", bn={"placement": placement, "input": bn_input})


def test_precise_bn_holds_the_population_statistics_each_layer_sees_at_inference() -> None:
    model = mlp("before_act", bn_input=True)
    x = torch.randn(250, 1, 6, 6) * 3 + 1
    precise = precise_bn(model, x, chunk=64)  # chunks of unequal size: the statistics are still exact
    # Walk the network by hand: each BN's statistics are those of its eval-mode input.
    h = x.flatten(1).double()
    for name, layer in precise.named_children():
        if isinstance(layer, nn.BatchNorm1d):
            assert torch.allclose(layer.running_mean.double(), h.mean(0), atol=1e-5), name
            assert torch.allclose(layer.running_var.double(), h.var(0, unbiased=True), rtol=1e-4), name
        h = layer.double()(h) if not isinstance(layer, nn.Flatten) else h
    assert not torch.equal(precise.fc1_bn.running_mean, model.fc1_bn.running_mean)  # the original is untouched
    assert torch.equal(model.fc1_bn.running_mean, torch.zeros(7))


def test_group_statistics_equal_train_mode_bn_on_each_group() -> None:
    model = mlp("after_act")
    x = torch.randn(20, 1, 6, 6)
    grouped = with_group_stats(model, 8)(x)  # groups 0-7, 8-15, 16-19
    model.train()
    expected = torch.cat([model(x[:8]), model(x[8:16]), model(x[16:])])
    assert torch.allclose(grouped, expected, atol=1e-5)


def test_one_instance_at_a_time_makes_bn_output_its_beta() -> None:
    model = mlp("before_act")
    with torch.no_grad():
        model.fc1_bn.bias.copy_(torch.arange(7.0))
    single = with_group_stats(model, 1)
    captured = []
    single.fc1_bn.register_forward_hook(lambda m, i, o: captured.append(o))
    single(torch.randn(5, 1, 6, 6))
    assert torch.allclose(captured[0], torch.arange(7.0).expand(5, 7))


def test_cnn_group_statistics_run_per_channel_over_space() -> None:
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 3, channels=[4], hidden=[6], activation="relu", act_args=None,
                init="he_normal", init_std=0.05, output_init="glorot_uniform",
                bn={"placement": "after_act", "input": True})
    x = torch.randn(6, 1, 8, 8)
    grouped = with_group_stats(model, 2)(x)
    model.train()
    assert torch.allclose(grouped, torch.cat([model(x[i : i + 2]) for i in range(0, 6, 2)]), atol=1e-5)


def test_without_bn_every_mode_agrees_with_the_ordinary_evaluation() -> None:
    model = mlp("none")
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 5, (64,))
    loss, acc = loss_and_accuracy(model, x, y, chunk=64)
    out = eval_modes(model, torch.randn(100, 1, 6, 6), x, y, batch_sizes=(1, 8), chunk=16)
    for key in ("precise", "batch1", "batch8"):
        assert out[f"test_acc_{key}"] == acc
        assert out[f"test_loss_{key}"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("placement", ["before_act", "after_act"])
def test_precise_bn_resuming_from_kept_activations_equals_restarting_from_the_input(placement: str) -> None:
    torch.manual_seed(1)
    model = CNN((1, 8, 8), 3, channels=[4], hidden=[6], activation="relu", act_args=None, init="he_normal",
                init_std=0.05, output_init="glorot_uniform", bn={"placement": placement, "input": True})
    x = torch.randn(100, 1, 8, 8) * 2 - 1
    kept, restarted = precise_bn(model, x, chunk=32), precise_bn(model, x, chunk=32, cache_bytes=0)
    for a, b in zip(kept.buffers(), restarted.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert not torch.equal(kept.conv1_bn.running_var if placement == "before_act" else kept.conv1_act_bn.running_var,
                           torch.ones(4))
