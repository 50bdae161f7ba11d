"""Normalization kinds (model.norm.*), the old model.bn form, depth/residual MLPs and the ResNet."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_cfg
from mlflow.tracking import MlflowClient
from torch import nn

from bnsweep.config import instantiate
from bnsweep.deploy.fold import fold_bn
from bnsweep.errors import ConfigError
from bnsweep.population.layers import WALK, StackedNet
from bnsweep.training import bn_eval, checkpoint
from bnsweep.training.checks import validate
from bnsweep.training.models import MLP, Residual
from bnsweep.training.norms import (
    KINDS,
    BatchRenorm1d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    canonical,
    kind_of,
    renorm_limits,
)
from bnsweep.training.resnet import ResNet
from bnsweep.training.run import run_training

MNIST = (1, 28, 28)
SMALL = {"MLP": ("mlp", {"hidden": [12, 12]}), "CNN": ("cnn", {"channels": [4], "hidden": [8]}),
         "ResNet": ("resnet", {"width": 4})}
MODEL_KINDS = [(m, k) for m in SMALL for k in KINDS if (m, k) != ("MLP", "instance")]


def build(model: str, kind: str, shape=MNIST, seed: int = 0, **norm) -> nn.Module:
    name, kw = SMALL[model]
    torch.manual_seed(seed)
    node = {**make_cfg(f"model={name}").model, **kw, "norm": {"kind": kind, **norm}}
    return instantiate(node, in_shape=shape, num_classes=10)


def trained(model: nn.Module, shape=MNIST, steps: int = 3, batch: int = 32) -> nn.Module:
    """A few training-mode passes with an SGD step each: running statistics and weights move off their init."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model.train()(torch.randn(batch, *shape, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------- the kinds themselves


def test_ghost_batch_norm_uses_each_virtual_batch_statistics() -> None:
    ghost, plain = GhostBatchNorm1d(5, momentum=0.1), nn.BatchNorm1d(5, momentum=0.1)
    ghost.virtual_batch = 4
    x = torch.randn(12, 5) * 3 + 1
    y = ghost.train()(x)
    expected = torch.cat([plain.train()(part) for part in x.split(4)])  # 3 batches in a row: the running stats too
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(ghost.running_mean, plain.running_mean)
    torch.testing.assert_close(ghost.running_var, plain.running_var)
    whole = nn.BatchNorm1d(5).train()(x)
    assert not torch.allclose(y, whole, atol=1e-3)  # not the whole batch's statistics
    g2 = GhostBatchNorm2d(3)
    g2.virtual_batch = 2
    img = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(g2.train()(img)[:2], nn.BatchNorm2d(3).train()(img[:2]))


def test_batch_renorm_is_bn_with_rmax_1_dmax_0_and_clips_r_and_d() -> None:
    x = torch.randn(64, 6) * 4 + 2
    renorm, plain = BatchRenorm1d(6, momentum=0.1), nn.BatchNorm1d(6, momentum=0.1)
    renorm.rmax, renorm.dmax, renorm.warmup_steps = 1.0, 0.0, 0
    torch.testing.assert_close(renorm.train()(x), plain.train()(x))
    torch.testing.assert_close(renorm.running_var, plain.running_var)
    # running statistics far from the batch's: r and d hit their limits (2 and 0.5 here)
    clipped = BatchRenorm1d(6, momentum=0.1, affine=False)
    clipped.rmax, clipped.dmax, clipped.warmup_steps = 2.0, 0.5, 0
    y = clipped.train()(x)  # running mean 0, var 1; the batch's std ~4 > 2, mean ~2 > 0.5
    mean, std = x.mean(0), torch.sqrt(x.var(0, unbiased=False) + clipped.eps)
    r = (std / (1 + clipped.eps) ** 0.5).clamp(0.5, 2.0)
    d = (mean / (1 + clipped.eps) ** 0.5).clamp(-0.5, 0.5)
    assert (r == 2.0).all() and (d == 0.5).all()
    torch.testing.assert_close(y, (x - mean) / std * r + d)
    assert renorm_limits(0, 3.0, 5.0, 100) == (1.0, 0.0)
    assert renorm_limits(50, 3.0, 5.0, 100) == (2.0, 2.5)
    assert renorm_limits(1000, 3.0, 5.0, 100) == (3.0, 5.0)


@pytest.mark.parametrize(("model", "kind"), MODEL_KINDS)
def test_every_kind_builds_with_its_layer_and_bias_rule(model: str, kind: str) -> None:
    net = build(model, kind)
    norms = [m for m in net.modules() if kind_of(m)]
    assert {kind_of(m) for m in norms} == ({kind} if kind != "none" else set())
    linear = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][0]
    assert (linear.bias is None) == (kind != "none")  # a mean-subtracting norm follows: no bias
    assert net(torch.randn(4, *MNIST)).shape == (4, 10)


# ---------------------------------------------------------------------- the old model.bn form


def test_old_bn_keys_are_the_same_settings_as_model_norm() -> None:
    assert canonical({}, {"placement": "none", "input": True})["kind"] == "none"
    assert canonical({}, {"placement": "after_act"}) | {} == canonical({"kind": "batch", "placement": "after_act"})
    for old, new in [(["model.bn.placement=after_act", "model.bn.input=true", "model.bn.momentum=0.1"],
                      ["model.norm.kind=batch", "model.norm.placement=after_act", "model.norm.input=true",
                       "model.norm.momentum=0.1"]),
                     (["model=cnn", "model.bn.placement=none"], ["model=cnn"])]:
        a, b = (instantiate(make_cfg(*o).model, in_shape=MNIST, num_classes=10) for o in (old, new))
        assert str(a) == str(b) and a.state_dict().keys() == b.state_dict().keys()
    with pytest.raises(ConfigError, match=r"model.bn.placement=before_act .* contradicts model.norm.kind=layer"):
        MLP(MNIST, 10, norm={"kind": "layer"}, bn={"placement": "before_act"})


def test_a_checkpoint_written_with_model_bn_still_loads() -> None:
    old_node = {"_target_": "bnsweep.training.models.MLP", "hidden": [8], "activation": "relu",
                "bn": {"placement": "before_act", "input": True, "momentum": 0.01, "eps": 1e-3, "affine": True,
                       "keep_bias": False}}
    model = checkpoint.build_model(old_node, MNIST, 10)
    data = checkpoint.to_bytes(model, old_node, MNIST, 10)
    loaded, _ = checkpoint.load(data)
    assert isinstance(loaded.fc1_bn, nn.BatchNorm1d) and isinstance(loaded.input_bn, nn.BatchNorm1d)


# ---------------------------------------------------------------------- bad input: one line naming key and value


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.norm.kind=group", "model.norm.groups=7"], "model.norm.groups=7 does not divide the 300 channels of fc1"),
    (["model.norm.kind=instance"], "model.norm.kind=instance is not allowed on fc1"),
    (["model.norm.kind=ghost_batch", "model.norm.virtual_batch=5"],
     "model.norm.virtual_batch=5 does not divide data.batch_size=32; allowed: a divisor"),
    (["model.norm.kind=batchnorm"], "model.norm.kind='batchnorm' is not allowed; choose one of: none, batch, "),
    (["model.norm.kind=layer", "model.norm.sync=true"], "model.norm.sync=true is not allowed with "
                                                        "model.norm.kind=layer"),
    (["model.norm.kind=batch", "model.norm.sync=true", "trainer=ddp", "trainer.accelerator=cpu"],
     "model.norm.sync=true is not allowed with trainer=ddp on CPU processes"),
    (["model.norm.kind=ghost_batch", "model.norm.virtual_batch=32", "trainer=ddp", "trainer.accelerator=cpu"],
     "model.norm.virtual_batch=32 does not divide data.batch_size=32 (a shard of 16 per device)"),
    (["model.bn.placement=before_act", "model.norm.kind=group"], "model.bn.placement=before_act (the old form of "
                                                                  "model.norm.kind=batch) contradicts"),
    (["model=resnet", "model.depth=10"], "model.depth=10 is not allowed with model=resnet; allowed: 6n+2"),
    (["model=cnn", "model.residual=true"], "model.residual=true is not allowed with model=cnn"),
])
def test_bad_norm_settings_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["layer", "group", "instance"])
def test_per_input_norms_refuse_to_fold_in_one_line(kind: str) -> None:
    with pytest.raises(ConfigError, match=rf"^model.norm.kind={kind} cannot be folded: .*allowed for batch"):
        fold_bn(build("CNN", kind), MNIST)


# ---------------------------------------------------------------------- folding, precise statistics, populations


@pytest.mark.parametrize("model", list(SMALL))
def test_running_statistic_kinds_fold_to_the_same_logits(model: str) -> None:
    shape = (1, 8, 8)  # small images: the same code paths, less time
    cases = [("batch", "after_act"), ("ghost_batch", "before_act"), ("batch_renorm", "after_act")]
    for kind, placement in cases[1:] if model == "ResNet" else cases:
        net = trained(build(model, kind, shape, placement=placement, input=model != "ResNet", virtual_batch=8,
                            warmup_steps=2), shape)
        folded = fold_bn(net, shape)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
        x = torch.randn(16, *shape)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4, msg=f"{kind} {placement}")


def test_residual_mlp_folds_and_its_precise_statistics_match_the_layer_walk() -> None:
    net = trained(MLP(MNIST, 10, depth=3, width=16, residual=True, norm={"kind": "batch"}))
    assert isinstance(net.res2, Residual) and isinstance(net.res3, Residual) and not hasattr(net, "res1")
    flat = trained(MLP(MNIST, 10, hidden=[16, 8], norm={"kind": "ghost_batch", "virtual_batch": 8}))
    x = torch.randn(300, *MNIST)
    walked = bn_eval.precise_bn(flat, x, chunk=100)
    hooked = bn_eval._precise_nested(copy.deepcopy(flat), x, chunk=100)
    for a, b in zip(walked.modules(), hooked.modules(), strict=True):
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            torch.testing.assert_close(a.running_var, b.running_var)
    precise = bn_eval.precise_bn(net, x, chunk=100)  # BN inside residual blocks: measured in network order
    assert not torch.equal(precise.res3.fc3_bn.running_mean, net.res3.fc3_bn.running_mean)


@pytest.mark.parametrize(("model", "kind"), [("MLP", "group"), ("CNN", "ghost_batch"), ("CNN", "batch_renorm"),
                                           ("CNN", "layer")])
def test_a_population_equals_its_members_for_every_kind(model: str, kind: str) -> None:
    """Forward (training mode, running statistics moving) and eval: the stacked net equals each single model.

    The kinds test_population.py's real runs (CASES) do not cover; together every kind of MLP and CNN."""
    norm = {"input": kind != "group" or model == "MLP", "virtual_batch": 8, "warmup_steps": 2}
    models = [build(model, kind, seed=s, **norm) for s in range(2)]
    net = StackedNet(models)
    x = torch.randn(16, *MNIST)
    for _ in range(2):
        torch.testing.assert_close(net.train()(x), torch.stack([m.train()(x) for m in models]), rtol=1e-5,
                                   atol=1e-5)
    torch.testing.assert_close(net.eval()(x), torch.stack([m.eval()(x) for m in models]), rtol=1e-5, atol=1e-5)
    state = net.member_state(1)
    for key, value in models[1].state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


def test_a_population_of_residual_mlps_equals_its_members_and_refuses_a_resnet() -> None:
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(trained(MLP(MNIST, 10, depth=3, width=16, residual=True,
                                  norm={"kind": "batch_renorm", "warmup_steps": 2})))
    net = StackedNet(models)
    x = torch.randn(16, *MNIST)
    torch.testing.assert_close(net.eval()(x), torch.stack([m.eval()(x) for m in models]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.train()(x), torch.stack([m.train()(x) for m in models]), rtol=1e-5, atol=1e-5)
    assert set(net.member_state(0)) == set(models[0].state_dict())
    stacked = bn_eval.precise_bn(net, x, chunk=8, walk=WALK)  # BN inside the stacked residual blocks too
    singles = [bn_eval.precise_bn(m, x, chunk=8) for m in models]
    for i, single in enumerate(singles):
        torch.testing.assert_close(stacked.layers[5].layers[1].running_var[i], single.res3.fc3_bn.running_var)
    with pytest.raises(ConfigError, match="model=resnet is not allowed with it"):
        StackedNet([build("ResNet", "batch") for _ in range(2)])


# ---------------------------------------------------------------------- depth, width, ResNet


def test_depth_and_width_are_shorthand_for_hidden() -> None:
    deep = instantiate(make_cfg("model.depth=64", "model.width=32", "model.norm.kind=batch").model,
                       in_shape=MNIST, num_classes=10)
    assert sum(isinstance(m, nn.Linear) for m in deep.modules()) == 65  # 64 hidden + logits
    assert MLP(MNIST, 10, hidden=[300, 100], depth=3).fc3.out_features == 300
    assert [m.out_features for m in MLP(MNIST, 10, hidden=[300, 100], width=7).modules()
            if isinstance(m, nn.Linear)] == [7, 7, 10]


@pytest.mark.parametrize("depth", [8, 14, 20])
def test_resnet_is_6n_plus_2_layers_on_either_input(depth: int) -> None:
    for shape in (MNIST, (3, 32, 32)):
        net = ResNet(shape, 10, depth=depth, width=4, norm={"kind": "batch"})
        weighted = [m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and "proj" not in n]
        assert len(weighted) == depth and net(torch.randn(2, *shape)).shape == (2, 10)


# ---------------------------------------------------------------------- real runs, every kind


@pytest.mark.parametrize(("model", "kind"), [(m, k) for m, k in MODEL_KINDS if m != "ResNet"])
def test_every_kind_trains_on_real_data(model: str, kind: str, data_root: str) -> None:
    """``bnsweep train model.norm.kind=<kind>`` in process, on real MNIST (the ResNet: the CLI test below)."""
    name, kw = SMALL[model]
    shape = [f"model.{k}={v}".replace(" ", "") for k, v in kw.items()]
    cfg = make_cfg(f"model={name}", *shape, f"model.norm.kind={kind}", "model.norm.virtual_batch=8",
                   f"data.root={data_root}", "data.limit_train=256", "data.val_size=100", "trainer.max_epochs=1",
                   "trainer.accelerator=cpu", "train.eval_batch_sizes=[2]", "train.train_eval_size=0", "threads=1",
                   f"train.precise_bn={str(model == 'MLP').lower()}")
    result = run_training(cfg, track=False)
    m = result.metrics
    assert result.outcome == "completed" and math.isfinite(m["test_loss"]) and 0 <= m["test_acc"] <= 1
    if kind in ("layer", "group", "instance", "none"):  # no batch statistics: (c) is (a)
        assert m["test_acc_batch2"] == m["test_acc"]
    else:  # two test images normalized by each other's statistics: not what the running statistics give
        assert m["test_acc_batch2"] != m["test_acc"]


def test_cli_trains_a_resnet_on_fashion_mnist(tmp_path: Path, data_root: str) -> None:
    out = subprocess.run([sys.executable, "-m", "bnsweep.train", "model=resnet", "model.width=4",
                          "model.norm.kind=batch_renorm", "model.norm.warmup_steps=4", "data=fashion_mnist",
                          f"data.root={data_root}", "data.limit_train=256", "data.val_size=100",
                          "trainer.max_epochs=1", "trainer.accelerator=cpu", "train.eval_batch_sizes=[]",
                          "train.precise_bn=false", "train.train_eval_size=0", f"tracking.store_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "epoch 1/1" in out.stderr and "test_acc" in out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bnsweep").experiment_id])
    assert run.data.params["model.norm.kind"] == "batch_renorm" and math.isfinite(run.data.metrics["test_acc"])
