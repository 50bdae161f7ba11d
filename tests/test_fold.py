"""BN folding: the folded model has no BN and the eval-mode logits of the original, on random and real MNIST."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_cfg
from mlflow.tracking import MlflowClient
from torch import nn

from bnsweep.deploy.export import ExportError, export
from bnsweep.deploy.fold import AddBiasMap, ChannelShift, SignedMaxPool2d, fold_bn
from bnsweep.errors import BnsweepError, ConfigError
from bnsweep.training import checkpoint
from bnsweep.training.data import acquire
from bnsweep.training.models import CNN, MLP
from bnsweep.training.run import run_training

TOL = 1e-4
MNIST = (1, 28, 28)
SMALL_CNN = {"channels": [8, 16], "hidden": [32]}


def randomize_bn(model: nn.Module, seed: int = 0, negative_gamma: bool = True) -> nn.Module:
    """Non-trivial BN state: random running mean/var, gamma (some negative) and beta; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                gamma = torch.rand(n, generator=gen) + 0.5
                if negative_gamma:
                    gamma *= torch.where(torch.rand(n, generator=gen) < 0.4, -1.0, 1.0)
                if m.affine:
                    m.weight.copy_(gamma)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)  # (Keras init: zero; a real test)
    return model.eval()


def build(arch: str, placement: str, input_bn: bool, in_shape=MNIST, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    bn = {"placement": placement, "input": input_bn, **kw.pop("bn", {})}
    model = MLP(in_shape, 10, hidden=[64, 32], bn=bn) if arch == "mlp" else CNN(in_shape, 10, bn=bn,
                                                                                **{**SMALL_CNN, **kw})
    return randomize_bn(model, seed)


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return (a(x) - b(x)).abs().max().item()


@pytest.fixture(scope="module")
def mnist_test(data_root: str) -> torch.Tensor:
    tensors, _ = acquire("mnist", Path(data_root), os.environ.get("BNSWEEP_DATA_MIRROR"))
    return tensors["test_x"][:1000].float().div(255)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("placement", ["none", "before_act", "after_act"])
@pytest.mark.parametrize("input_bn", [False, True])
def test_folded_logits_match_eval_mode(arch: str, placement: str, input_bn: bool, mnist_test: torch.Tensor) -> None:
    model = build(arch, placement, input_bn)
    original = copy.deepcopy(model.state_dict())
    folded = fold_bn(model, MNIST)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert not folded.training
    gen = torch.Generator().manual_seed(1)
    for x in (torch.rand(256, *MNIST, generator=gen), torch.randn(256, *MNIST, generator=gen), mnist_test):
        assert max_diff(model, folded, x) <= TOL
    with torch.inference_mode():
        assert (model(mnist_test).argmax(1) == folded(mnist_test).argmax(1)).all()
        if placement != "none" or input_bn:  # the BN really did something: folding it away was not a no-op
            bare = copy.deepcopy(model)
            for name, m in bare.named_children():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    setattr(bare, name, nn.Identity())
            assert (bare(mnist_test) - model(mnist_test)).abs().max() > 1e-2
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # original untouched


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("placement", ["before_act", "after_act"])
@pytest.mark.parametrize("bn", [{"affine": False}, {"keep_bias": True}, {"affine": False, "keep_bias": True}])
def test_bn_without_gamma_beta_or_after_a_bias_folds(arch: str, placement: str, bn: dict,
                                                     mnist_test: torch.Tensor) -> None:
    model = build(arch, placement, True, bn=bn)
    if bn.get("keep_bias") and placement == "before_act":  # a BN right after a layer with a (nonzero) bias
        assert model.fc1.bias is not None and model.fc1.bias.abs().max() > 0.1
    folded = fold_bn(model, MNIST)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert max_diff(model, folded, mnist_test) <= TOL
    assert max_diff(model, folded, torch.randn(64, *MNIST, generator=torch.Generator().manual_seed(2))) <= TOL


@pytest.mark.parametrize("placement", ["before_act", "after_act"])
def test_cnn_on_multichannel_input_and_default_size(placement: str, mnist_test: torch.Tensor) -> None:
    model = build("cnn", placement, True, in_shape=(3, 32, 32), seed=2)
    x = torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert max_diff(model, fold_bn(model), x) <= TOL
    torch.manual_seed(3)
    default = randomize_bn(CNN(MNIST, 10, bn={"placement": placement, "input": True}), seed=3)
    assert max_diff(default, fold_bn(default), mnist_test[:500]) <= TOL


def test_negative_gamma_before_max_pool_pools_the_flipped_channels(mnist_test: torch.Tensor) -> None:
    model = build("cnn", "after_act", False, seed=4)
    with torch.no_grad():
        model.conv1_act_bn.weight.copy_(-model.conv1_act_bn.weight.abs())  # every channel a < 0
        model.conv2_act_bn.weight.copy_(model.conv2_act_bn.weight.abs())  # every channel a > 0
    folded = fold_bn(model)
    assert isinstance(folded.conv1_pool, SignedMaxPool2d) and (folded.conv1_pool.sign < 0).all()
    assert type(folded.conv2_pool) is nn.MaxPool2d  # a > 0: the plain pool, no extra op
    assert max_diff(model, folded, mnist_test) <= TOL
    naive = copy.deepcopy(folded)
    naive.conv1_pool = nn.MaxPool2d(2)  # pooling x where the BN map flips its sign picks the wrong element
    assert max_diff(model, naive, mnist_test) > 1e-2


def test_padded_conv_gets_the_shift_before_its_zero_padding(mnist_test: torch.Tensor) -> None:
    model = build("cnn", "none", True, seed=5)
    folded = fold_bn(model)
    assert isinstance(folded.conv1_shift, ChannelShift) and folded.conv1.padding == (1, 1)
    assert max_diff(model, folded, mnist_test) <= TOL
    # The scalar-bias fold (exact only without padding) is wrong at the image border, right inside it.
    naive = copy.deepcopy(folded)
    del naive.conv1_shift
    with torch.no_grad():
        naive.conv1.bias += naive.conv1.weight.sum(dim=(2, 3)) @ folded.conv1_shift.shift.flatten()
    head, naive_head = nn.Sequential(model.input_bn, model.conv1), naive.conv1
    with torch.inference_mode():
        inner = head(mnist_test)[:, :, 1:-1, 1:-1]
        assert (naive_head(mnist_test)[:, :, 1:-1, 1:-1] - inner).abs().max() <= TOL
    assert max_diff(head, naive_head, mnist_test) > 1e-2


def test_zero_gamma_before_padded_conv_uses_an_exact_bias_map(mnist_test: torch.Tensor) -> None:
    model = build("cnn", "after_act", False, seed=6)
    with torch.no_grad():
        model.conv1_act_bn.weight[:3] = 0.0  # these channels become the constant beta
    folded = fold_bn(model, MNIST)
    assert isinstance(folded.conv2_bias_map, AddBiasMap) and folded.conv2_bias_map.bias.shape == (16, 14, 14)
    assert max_diff(model, folded, mnist_test) <= TOL
    with pytest.raises(ValueError, match="needs in_shape"):
        fold_bn(model)


def test_bn_without_running_stats_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="cannot be folded"):
        fold_bn(model)


# --------------------------------------------------------------------------- export


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnsweep.export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_export_cli_logs_a_folded_program_and_latency_to_the_run(mlflow_server: str, data_root: str,
                                                                 mnist_test: torch.Tensor) -> None:
    cfg = make_cfg("experiment=seed001_bn", "data.limit_train=2000", "data.val_size=1000", "trainer.max_epochs=1",
                   "trainer.accelerator=cpu", "optimizer.lr=0.05", f"data.root={data_root}",
                   f"tracking.uri={mlflow_server}", "tracking.experiment=t_export")
    run_id = run_training(cfg).run_id
    out = export_cli(f"run_id={run_id}", f"tracking.uri={mlflow_server}", "threads=1", "latency.repeats=20",
                     "latency.budget_s=0.5")
    assert out.returncode == 0, out.stderr
    assert "max |Δ logits|" in out.stderr and "folded/no-BN" in out.stderr
    client = MlflowClient(mlflow_server)
    files = {a.path for a in client.list_artifacts(run_id, "folded")}
    assert files == {"folded/state_dict.pt", "folded/model.pt2", "folded/architecture.txt", "folded/report.json"}
    run = client.get_run(run_id)
    m = run.data.metrics
    assert run.data.tags["folded_format"] == "torch.export"
    assert 0 <= m["fold_max_abs_diff"] <= TOL and m["fold_bn_layers"] == 3
    for b in (1, 1024):
        for name in ("nobn", "bn", "folded"):
            assert m[f"latency_b{b}_ms_{name}"] > 0
        assert m[f"latency_b{b}_ratio_folded_nobn"] == pytest.approx(
            m[f"latency_b{b}_ms_folded"] / m[f"latency_b{b}_ms_nobn"])
    # The exported program runs without bnsweep and gives the trained model's logits on real images.
    model, _ = checkpoint.load(client.download_artifacts(run_id, "model.pt"))
    program = torch.export.load(client.download_artifacts(run_id, "folded/model.pt2")).module()
    assert max_diff(model, program, mnist_test) <= TOL
    assert max_diff(model, program, mnist_test[:1]) <= TOL  # the batch size is dynamic
    plain = fold_bn(model)
    plain.load_state_dict(torch.load(client.download_artifacts(run_id, "folded/state_dict.pt"), weights_only=True))
    assert max_diff(model, plain, mnist_test) <= TOL


def test_export_of_a_checkpoint_file_writes_beside_it(tmp_path: Path, mnist_test: torch.Tensor) -> None:
    model = build("cnn", "after_act", True, seed=7)
    # the model class under its old name (bnsweep.models): files written before the package was split still load
    cfg = {"_target_": "bnsweep.models.CNN", **SMALL_CNN, "bn": {"placement": "after_act", "input": True}}
    (tmp_path / "model.pt").write_bytes(checkpoint.to_bytes(model, cfg, MNIST, 10))
    report = export(make_cfg(f"checkpoint={tmp_path / 'model.pt'}", "latency.enabled=false", config="export"))
    assert report["metrics"]["fold_max_abs_diff"] <= TOL and "latency_b1_ms_folded" not in report["metrics"]
    program = torch.export.load(tmp_path / "folded" / "model.pt2").module()
    assert max_diff(model, program, mnist_test) <= TOL


def test_export_input_errors_name_the_problem(mlflow_server: str, tmp_path: Path) -> None:
    uri = f"tracking.uri={mlflow_server}"
    cases = {("run_id=abc", f"checkpoint={tmp_path}/m.pt"): "exactly one of run_id=<MLflow run id> or checkpoint",
             (): "(got neither)",
             (f"checkpoint={tmp_path}/none.pt",): f"checkpoint={tmp_path}/none.pt: no such file"}
    empty = MlflowClient(mlflow_server).create_run(MlflowClient(mlflow_server).create_experiment("t_export_empty"))
    cases[(f"run_id={empty.info.run_id}",)] = f"run_id={empty.info.run_id} has no model.pt artifact"
    for args, message in cases.items():
        with pytest.raises(BnsweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
            export(make_cfg(*args, uri, config="export"))
    absent = "0123abc" + "0" * 25  # well formed (32 hex characters), in no experiment
    with pytest.raises(ExportError, match=f"run_id={absent}: no such MLflow run in {mlflow_server}"):
        export(make_cfg(f"run_id={absent}", uri, config="export"))
    with pytest.raises(ConfigError, match="run_id='0123abc' is not allowed: an MLflow run id is 32 hexadecimal"):
        export(make_cfg("run_id=0123abc", uri, config="export"))
    out = export_cli(f"run_id={absent}", uri)  # the command line: one line, no traceback
    assert out.returncode != 0
    assert out.stderr.strip() == f"error: run_id={absent}: no such MLflow run in {mlflow_server}"
