"""Real short trainings on MNIST from the mirror, logged to a real MLflow server."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_cfg
from mlflow.tracking import MlflowClient

from bnsweep.errors import ConfigError, TrackingError
from bnsweep.training import checkpoint
from bnsweep.training.data import InMemoryDataModule
from bnsweep.training.run import run_training

QUICK = ["data.limit_train=3000", "data.val_size=1000", "trainer.max_epochs=2", "trainer.accelerator=cpu"]
EPOCH_KEYS = ["train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s"]
FINAL_KEYS = ["test_acc", "test_loss", "best_val_acc", "runtime_s", "eval_time_s", "epochs_to_converge",
              "steps_to_converge", "converged", "epochs_run", "s_per_epoch", "train_acc_eval", "train_loss_eval"]


def test_one_tracked_run_reads_back_from_the_mlflow_server(mlflow_server: str, data_root: str) -> None:
    cfg = make_cfg("experiment=seed001_bn", *QUICK, "optimizer.lr=0.05", "train.target_acc=0.5",
                   f"data.root={data_root}", f"tracking.uri={mlflow_server}", "tracking.experiment=t_one")
    result = run_training(cfg)
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_KEYS:  # at step = optimizer steps at each epoch's end (val_every > an epoch here)
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == [r["step"] for r in result.history], key
    for key in FINAL_KEYS + ["params_trainable", "params_non_trainable"]:
        assert key in run.data.metrics, key
    m = run.data.metrics
    assert 0.5 < m["test_acc"] <= 1 and m["converged"] == 1 and m["epochs_to_converge"] in (1, 2)
    assert m["steps_to_converge"] == result.history[int(m["epochs_to_converge"]) - 1]["step"]
    assert m["best_val_acc"] == max(h.value for h in client.get_metric_history(result.run_id, "val_acc"))
    assert m["params_non_trainable"] == 2368
    # BN at inference: population statistics ~ running averages here; one image at a time, BN's
    # batch statistics are degenerate (every BN outputs its beta) and the model guesses one class.
    assert abs(m["precise_bn_gain"] - (m["test_acc_precise"] - m["test_acc"])) < 1e-9
    assert abs(m["precise_bn_gain"]) < 0.05
    assert m["test_acc_batch1"] < 0.3 < m["test_acc_batch8"] <= m["test_acc_batch32"] + 0.02
    p = run.data.params
    assert p["model.bn.placement"] == "after_act" and p["model.bn.input"] == "True"
    assert p["optimizer.lr"] == "0.05" and p["data.batch_size"] == "32"
    t = run.data.tags
    assert len(t["git_commit"]) >= 7 and t["torch_version"] and t["device"] == "cpu"
    source = re.fullmatch(r"(?:cache \()?(?:files in|mirror) ([^)]+)\)?", t["data_source"])
    assert source and (ROOT / source.group(1)).is_dir(), t["data_source"]  # the folder its data really came from
    assert t["diverged"] == "false"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "model_summary.txt", "model.pt"} <= artifacts
    summary = client.download_artifacts(result.run_id, "model_summary.txt")
    assert "non-trainable: 2,368" in Path(summary).read_text()
    # The logged weights rebuild the trained model: same test accuracy without Hydra or Lightning.
    model, meta = checkpoint.load(client.download_artifacts(result.run_id, "model.pt"))
    assert meta["in_shape"] == [1, 28, 28] and meta["num_classes"] == 10 and not model.training
    test = InMemoryDataModule("mnist", data_root, os.environ.get("BNSWEEP_DATA_MIRROR"))
    test.setup("test")
    correct = n = 0
    with torch.no_grad():
        for chunk in test.test_dataloader():
            for x, y in chunk:
                correct += int((model(x).argmax(1) == y).sum())
                n += len(y)
    assert correct / n == pytest.approx(m["test_acc"], abs=1e-9)
    # train_acc_eval: eval mode (running statistics) on the first training images, here all 3,000 (5,000 capped)
    train = InMemoryDataModule("mnist", data_root, os.environ.get("BNSWEEP_DATA_MIRROR"), val_size=1000,
                               limit_train=3000)
    train.setup("fit")
    x, y = train.tensors["train_x"], train.tensors["train_y"]
    assert len(x) == 3000
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).double().mean()) == pytest.approx(m["train_acc_eval"], abs=1e-9)


def test_train_acc_eval_counts_the_first_train_eval_size_images_or_is_off(data_root: str) -> None:
    tiny = [*QUICK, "data.limit_train=320", "trainer.max_epochs=1", "model.hidden=[16]", "train.precise_bn=false",
            "train.eval_batch_sizes=[]", "model.bn.placement=before_act", f"data.root={data_root}"]
    some = run_training(make_cfg(*tiny, "train.train_eval_size=7"), track=False).metrics
    assert some["train_acc_eval"] * 7 == pytest.approx(round(some["train_acc_eval"] * 7), abs=1e-9)  # k of 7 images
    assert "train_acc_eval" not in run_training(make_cfg(*tiny, "train.train_eval_size=0"), track=False).metrics
    with pytest.raises(ConfigError, match=r"train.train_eval_size=-1 is not allowed"):
        run_training(make_cfg(*tiny, "train.train_eval_size=-1"), track=False)


def test_same_config_and_seed_give_the_same_numbers(data_root: str) -> None:
    cfg = make_cfg(*QUICK, "trainer.max_epochs=1", "model.bn.placement=before_act", f"data.root={data_root}",
                   "train.val_every=30")
    a, b = run_training(cfg, track=False), run_training(cfg, track=False)
    keys = ["train_loss", "train_acc", "val_loss", "val_acc"]
    assert [[r[k] for k in keys] for r in a.history] == [[r[k] for k in keys] for r in b.history]
    assert len(a.checks) == 4 and a.checks == b.checks  # 3 within the epoch (94 steps), 1 at its end
    assert a.metrics["test_acc"] == b.metrics["test_acc"]
    assert a.metrics["epochs_to_converge"] == b.metrics["epochs_to_converge"]
    c = run_training(make_cfg(*QUICK, "trainer.max_epochs=1", "model.bn.placement=before_act",
                              f"data.root={data_root}", "seed=1"), track=False)
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]


def test_a_diverging_run_stops_and_is_recorded(mlflow_server: str, data_root: str) -> None:
    cfg = make_cfg(*QUICK, "trainer.max_epochs=5", "optimizer.lr=1e4", f"data.root={data_root}",
                   f"tracking.uri={mlflow_server}", "tracking.experiment=t_diverge")
    result = run_training(cfg)
    assert result.diverged and len(result.history) == 0  # stopped inside the first epoch
    run = MlflowClient(mlflow_server).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "true"
    assert run.data.metrics["converged"] == 0 and run.data.metrics["epochs_to_converge"] == 6
    assert run.data.metrics["steps_to_converge"] == 6 * 94  # censored: 6 epochs of 3000 images at batch 32
    assert "test_acc" not in run.data.metrics


def test_unreachable_tracking_server_fails_before_training(data_root: str) -> None:
    cfg = make_cfg(*QUICK, "tracking.uri=http://127.0.0.1:9", f"data.root={data_root}")
    with pytest.raises(TrackingError, match="http://127.0.0.1:9 is not reachable"):
        run_training(cfg)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnsweep.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_cli_bad_value_is_one_clear_line() -> None:
    out = cli("model.bn.placement=middle")
    assert out.returncode != 0
    assert out.stderr.strip() == ("error: model.bn.placement='middle' is not allowed; "
                                  "choose one of: none, before_act, after_act")


def test_cli_trains_and_prints_the_answer(tmp_path, data_root: str) -> None:
    out = cli(*QUICK, "trainer.max_epochs=1", f"data.root={data_root}", f"tracking.store_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert "epoch 1/1" in out.stderr and "test_acc" in out.stderr and "bnsweep ui" in out.stderr
    assert (tmp_path / "mlflow.db").exists()
    assert not (ROOT / "outputs").exists() and not (ROOT / ".hydra").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bnsweep").experiment_id])
    assert math.isfinite(run.data.metrics["test_acc"])
