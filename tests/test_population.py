"""Population training: each member equals its single run; dropped members disturb nobody; a real sweep."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from helpers import RunIf, make_cfg, runs_by_role, tiny_population_sweep
from mlflow.tracking import MlflowClient

from bnsweep.config import instantiate
from bnsweep.errors import ConfigError
from bnsweep.population.layers import StackedNet
from bnsweep.population.loop import run_population, train_step
from bnsweep.population.optim import StackedOptimizer
from bnsweep.sweep.definition import parse
from bnsweep.sweep.slots import best_trial, is_repeat
from bnsweep.training.run import RunResult, run_training

SMALL = ("data.limit_train=600", "data.val_size=500", "data.eval_batch_size=250", "trainer.max_epochs=2",
         "trainer.accelerator=cpu", "train.eval_batch_sizes=[]", "model.hidden=[32,16]", "threads=1",
         "train.val_every=5")  # 19 steps per epoch: checks at steps 5, 10, 15, 19 (end), 24, 29, 34, 38 (end)
EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc")
FINAL = ("best_val_acc", "epochs_to_converge", "steps_to_converge", "converged", "epochs_run", "test_acc",
         "test_loss", "test_acc_precise", "params_trainable", "params_non_trainable", "test_acc_batch1",
         "test_acc_batch8", "test_loss_batch8", "train_acc_eval", "train_loss_eval")


def configs(tmp_path: Path, members: list[tuple[float, int]], *extra: str) -> list:
    return [make_cfg(*SMALL, f"tracking.store_dir={tmp_path}", f"optimizer.lr={lr}", f"seed={seed}", *extra)
            for lr, seed in members]


@pytest.fixture(scope="module")
def dm():
    data = instantiate(make_cfg(*SMALL).data)
    data.setup("fit")
    return data


def alone(cfg, dm) -> RunResult:
    dm.seed = int(cfg.data.seed)  # as a sweep worker: one copy of the data, the run's own batch order
    return run_training(cfg, datamodule=dm, track=False)


def assert_same(member: RunResult, single: RunResult, tol: float = 1e-4) -> None:
    assert member.outcome == single.outcome
    assert len(member.history) == len(single.history)
    for a, b in zip(member.history, single.history, strict=True):
        assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
        for key in EPOCH:
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), (key, a["epoch"])
    assert [(c["step"], c["samples"], c["val_epoch"]) for c in member.checks] == [
        (c["step"], c["samples"], c["val_epoch"]) for c in single.checks]
    for a, b in zip(member.checks, single.checks, strict=True):
        assert a["val_acc"] == pytest.approx(b["val_acc"], rel=tol, abs=tol), a["step"]
    for key in FINAL:
        if key in single.metrics:
            assert member.metrics[key] == pytest.approx(single.metrics[key], rel=tol, abs=tol), key


# Every placement (incl. input BN) and every optimizer; shared batches (one data seed) and own orders.
CASES = {
    "none-sgd-shared": ([(0.05, 0), (0.2, 0)], ["model.bn.placement=none", "optimizer=sgd"]),
    "before_act-momentum": ([(0.05, 0), (0.2, 0), (0.05, 1)], ["model.bn.placement=before_act", "optimizer=momentum"]),
    "after_act-input-nesterov": ([(0.05, 0), (0.1, 2)], ["model.bn.placement=after_act", "model.bn.input=true",
                                                        "model.activation=sigmoid", "optimizer=nesterov",
                                                        "train.eval_batch_sizes=[1,8]"]),  # batched for all members
    "before_act-adam-shared": ([(1e-3, 0), (3e-3, 0), (1e-2, 0)], ["model.bn.placement=before_act", "optimizer=adam",
                                                                    "optimizer.weight_decay=1e-4"]),
    "after_act-input-rmsprop": ([(1e-3, 0), (3e-3, 1)], ["model.bn.placement=after_act", "model.bn.input=true",
                                                         "optimizer=rmsprop", "optimizer.momentum=0.5"]),
    "cnn-before_act-sgd": ([(0.05, 0), (0.1, 1)], ["model=cnn", "model.channels=[4]", "model.hidden=[16]",
                                                   "model.bn.placement=before_act", "trainer.max_epochs=1",
                                                   "train.eval_batch_sizes=[1,8]"]),
    # BN without gamma/beta (incl. input BN and small-batch evaluation), and a kept bias before BN
    "before_act-no_affine-keep_bias": ([(0.05, 0), (0.2, 1)], ["model.bn.placement=before_act", "model.bn.input=true",
                                                               "model.bn.affine=false", "model.bn.keep_bias=true",
                                                               "train.eval_batch_sizes=[1,8]",
                                                               "train.train_eval_size=250"]),
    "cnn-after_act-no_affine": ([(0.05, 0), (0.1, 0)], ["model=cnn", "model.channels=[4]", "model.hidden=[16]",
                                                        "model.bn.placement=after_act", "model.bn.affine=false",
                                                        "trainer.max_epochs=1", "train.eval_batch_sizes=[2]"]),
    "cnn-before_act-keep_bias": ([(0.05, 0), (0.1, 1)], ["model=cnn", "model.channels=[4]", "model.hidden=[16]",
                                                         "model.bn.placement=before_act", "model.bn.keep_bias=true",
                                                         "trainer.max_epochs=1"]),
    # the other norm kinds (model.norm.kind): per-virtual-batch and renormalized statistics, per-input group norms
    "ghost_batch-input": ([(0.05, 0), (0.2, 1)], ["model.norm.kind=ghost_batch", "model.norm.virtual_batch=8",
                                                  "model.norm.input=true", "train.eval_batch_sizes=[1,8]"]),
    "batch_renorm-after_act": ([(0.05, 0), (0.2, 0)], ["model.norm.kind=batch_renorm", "model.norm.warmup_steps=10",
                                                       "model.norm.placement=after_act", "optimizer=momentum"]),
    "layer-adam": ([(1e-3, 0), (3e-3, 1)], ["model.norm.kind=layer", "optimizer=adam"]),
    "residual-batch": ([(0.05, 0), (0.2, 1)], ["model.depth=3", "model.width=16", "model.residual=true",
                                               "model.norm.kind=batch", "train.eval_batch_sizes=[2]"]),
    "cnn-group": ([(0.05, 0), (0.1, 1)], ["model=cnn", "model.channels=[4]", "model.hidden=[16]",
                                          "model.norm.kind=group", "model.norm.groups=2", "trainer.max_epochs=1"]),
    "cnn-instance-input": ([(0.05, 0), (0.1, 0)], ["model=cnn", "model.channels=[4]", "model.hidden=[16]",
                                                   "model.norm.kind=instance", "model.norm.input=true",
                                                   "trainer.max_epochs=1", "train.eval_batch_sizes=[2]"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_member_equals_its_single_run(case: str, tmp_path: Path, dm) -> None:
    members, extra = CASES[case]
    cfgs = configs(tmp_path, members, *extra)
    population = run_population(cfgs, datamodule=dm, track=False)
    for member, cfg in zip(population, cfgs, strict=True):
        single = alone(cfg, dm)
        assert single.outcome == "completed" and member.metrics["runtime_s"] > 0
        assert_same(member, single, tol=1e-3 if case.startswith("cnn") else 1e-4)
        assert {k for k in single.metrics if "_batch" in k} == {k for k in member.metrics if "_batch" in k}
        assert 0 < member.metrics["train_acc_eval"] <= 1 and "train_acc_eval" in single.metrics
    assert population[0].history != population[1].history  # the members did train differently


@pytest.mark.parametrize("seeds", [(0, 0, 0, 0), (0, 1, 0, 2), (0, 1, 0, 0)],
                         ids=["shared-batches", "own-orders", "down-to-one-order"])
def test_a_diverging_and_a_pruned_member_leave_the_others_untouched(seeds: tuple, tmp_path: Path, dm) -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.2))
    trials = [study.ask() for _ in range(4)]
    done: list[int] = []
    # lr 5000 blows up before the first check; lr 1e-6 stays at chance and the pruner stops it at its first check
    lrs = [0.2, 5000.0, 1e-6, 0.4]
    result = run_population(configs(tmp_path, list(zip(lrs, seeds, strict=True))), datamodule=dm,
                            track=False, trials=trials, on_done=lambda i, r: done.append(i))
    reference = run_population(configs(tmp_path, [(0.2, seeds[0]), (0.4, seeds[3])]), datamodule=dm, track=False)
    assert done[:2] == [1, 2] and sorted(done) == [0, 1, 2, 3]  # dropped members finish at once
    diverged, pruned = result[1], result[2]
    assert diverged.outcome == "diverged" and diverged.metrics["diverged"] == 1.0 and not diverged.history
    assert "test_acc" not in diverged.metrics and trials[1].number not in [t.number for t in study.trials
                                                                          if t.intermediate_values]
    assert pruned.outcome == "pruned" and not pruned.history and "test_acc" not in pruned.metrics
    assert [c["step"] for c in pruned.checks] == [5] and not diverged.checks
    assert list(study.trials[2].intermediate_values) == [5]  # reported as CheckPruning does: step = optimizer steps
    for member, ref in zip((result[0], result[3]), reference, strict=True):
        assert member.outcome == "completed"
        assert_same(member, ref, tol=1e-5)


def test_population_sweep_runs_every_trial_once_as_its_own_run(mlflow_server: str, tmp_path: Path) -> None:
    """The tiny sweep with population=3 through the real driver, worker, journal storage and MLflow server."""
    name = "t_pop"
    studies = tiny_population_sweep(mlflow_server, tmp_path, name, 3)
    for s in studies:
        assert sorted(t.user_attrs["slot"] for t in s.trials) == [0, 1, 2, 3, 4]
        best, repeats = best_trial(s.trials), [t for t in s.trials if is_repeat(t)]
        assert not is_repeat(best) and sorted(t.user_attrs["seed"] for t in repeats) == [1, 2]
        assert all(t.params == best.params for t in repeats)
        assert all(0 < t.user_attrs["metrics"]["train_acc_eval"] <= 1 for t in s.trials)  # what the report reads
    runs = runs_by_role(mlflow_server, name)["trial"]
    assert len(runs) == 10 and all(r.info.status == "FINISHED" for r in runs)
    # the 3 LR trials of a cell trained as one population, its 2 repeats (seeds 1, 2) as another
    assert sorted(r.data.tags["bnsweep.population"] for r in runs) == ["2"] * 4 + ["3"] * 6
    client = MlflowClient(mlflow_server)
    for r in runs:
        assert {"test_acc", "test_acc_precise", "train_acc_eval", "best_val_acc", "epochs_to_converge", "runtime_s",
                "s_per_epoch", "train_loss", "val_acc", "epoch_time_s", "params_trainable"} <= set(r.data.metrics)
        val_epoch = client.get_metric_history(r.info.run_id, "val_epoch")  # tiny: val_every > one epoch
        assert [m.value for m in val_epoch] == [1.0]
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")] == [val_epoch[0].step]
        assert r.data.tags["outcome"] == "completed" and "mlflow.parentRunId" in r.data.tags
    assert {(r.data.tags["optuna.study"], r.data.tags["optuna.trial"]) for r in runs} == {
        (s.study_name, str(t.number)) for s in studies for t in s.trials}


RAW = {"name": "p", "base": ["data.limit_train=100"], "grid": {"model.bn.placement": ["none"]},
       "search": {"optimizer.lr": {"low": 1e-3, "high": 1.0, "log": True}}, "n_trials": 4}


@pytest.mark.parametrize(("changes", "message"), [
    ({"population": 0}, "sweep.population=0 is not allowed; it must be an integer >= 1"),
    ({"population": 2.5}, "sweep.population=2.5 is not allowed; it must be an integer >= 1"),
    ({"population": "8"}, "sweep.population='8' is not allowed; it must be an integer >= 1"),
    ({"population": 4, "search": {"model.bn.momentum": {"low": 0.001, "high": 0.1}}},
     "sweep.population=4 is not allowed with sweep.search over model.bn.momentum"),
    ({"population": 4, "base": ["data.limit_train=100", "train.diagnostics=true"]},
     "train.diagnostics=true is not allowed with population training"),
    ({"population": 4, "base": ["optimizer=adam", "+optimizer.amsgrad=true"]},
     "optimizer.amsgrad=True is not allowed with population training; adam supports: betas, eps, lr"),
])
def test_bad_population_is_one_clear_error(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({**RAW, **changes})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_population_of_one_or_none_is_one_trial_at_a_time() -> None:
    assert parse(RAW).population == 1 and parse({**RAW, "population": None}).population == 1
    assert parse({**RAW, "population": 8}).population == 8


@RunIf(gpu=True)
def test_gpu_population_matches_cpu_and_steps_without_host_sync(tmp_path: Path) -> None:
    members = [(0.05, 0), (0.2, 0), (0.1, 1)]
    extra = ["model.bn.placement=after_act", "model.bn.input=true", "optimizer=momentum"]
    cpu = run_population(configs(tmp_path, members, *extra), track=False)
    gpu_cfgs = configs(tmp_path, members, *extra, "trainer.accelerator=gpu")
    gpu = run_population(gpu_cfgs, track=False)
    for a, b in zip(gpu, cpu, strict=True):
        assert_same(a, b, tol=1e-3)
    models = []
    for cfg in gpu_cfgs:
        torch.manual_seed(int(cfg.seed))
        models.append(instantiate(cfg.model, in_shape=(1, 28, 28), num_classes=10))
    net = StackedNet(models).cuda()
    opt = StackedOptimizer(list(net.parameters()), {"_target_": "torch.optim.SGD", "momentum": 0.9},
                           torch.tensor([0.05, 0.2, 0.1]))
    x, y = torch.rand(32, 1, 28, 28, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    sums = torch.zeros(3, 2, device="cuda")
    train_step(net, opt, x, y, False, sums)  # warm-up: lazy state allocation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            train_step(net, opt, x, y, False, sums)
    finally:
        torch.cuda.set_sync_debug_mode("default")
