"""Convergence measured within the epoch: fractional epochs and steps to the target, checks every val_every steps."""

from __future__ import annotations

import optuna
import pytest
from helpers import make_cfg
from mlflow.tracking import MlflowClient

from bnsweep.errors import ConfigError
from bnsweep.training.checks import validate
from bnsweep.training.convergence import Check, Convergence, convergence_metrics, first_reaching
from bnsweep.training.pruning import CheckPruning
from bnsweep.training.run import run_training

TRAIN = 1000  # training images of the crafted histories
STEPS = 32  # optimizer steps per epoch of the crafted histories (batch 32, the last one 8 images)


def test_reached_at_a_mid_epoch_check_counts_the_samples_seen_then() -> None:
    checks = [Check(8, 256, 0.5), Check(16, 512, 0.93), Check(24, 768, 0.96), Check(32, 1000, 0.97)]
    got = first_reaching(checks, 0.95, TRAIN, budget=3, steps_per_epoch=STEPS)
    assert got == Convergence(768 / TRAIN, 24, 1)
    assert 0 < got.epochs < 1  # a whole-epoch count would have said 1


def test_reached_at_the_first_check() -> None:
    assert first_reaching([Check(8, 256, 0.99), Check(16, 512, 0.5)], 0.95, TRAIN, 3, STEPS) == (0.256, 8, 1)


def test_a_check_exactly_at_the_target_reaches_it() -> None:
    checks = [Check(8, 256, 0.9), Check(40, 1256, 0.95), Check(48, 1512, 0.97)]
    assert first_reaching(checks, 0.95, TRAIN, 3, STEPS) == (1.256, 40, 1)


def test_never_reached_is_censored_at_budget_plus_one_in_epochs_and_steps() -> None:
    checks = [Check(8 * k, 256 * k, 0.5 + 0.01 * k) for k in range(1, 13)]
    assert first_reaching(checks, 0.95, TRAIN, budget=3, steps_per_epoch=STEPS) == (4.0, 4 * STEPS, 0)
    assert first_reaching([], 0.95, TRAIN, budget=5, steps_per_epoch=STEPS) == (6.0, 6 * STEPS, 0)


def test_metrics_of_a_check_history() -> None:
    checks = [Check(8, 256, 0.7), Check(16, 512, 0.91), Check(24, 768, 0.89), Check(32, 1000, 0.93)]
    history = [{"epoch": 1, "val_acc": 0.93}]
    m = convergence_metrics(checks, history, 0.9, budget=2, train_size=TRAIN, steps_per_epoch=STEPS)
    assert m == {"best_val_acc": 0.93, "epochs_to_converge": 0.512, "steps_to_converge": 16, "converged": 1,
                 "epochs_run": 1}
    assert isinstance(m["epochs_to_converge"], float) and isinstance(m["steps_to_converge"], int)


@pytest.mark.parametrize("value", [0, -5, 2.5, "often", True])
def test_bad_val_every_is_one_clear_line(value: object) -> None:
    cfg = make_cfg(f"train.val_every={value}")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(f"train.val_every={cfg.train.val_every!r} is not allowed; it must be an integer")
    assert "\n" not in str(e.value)


def test_val_every_null_or_positive_passes() -> None:
    validate(make_cfg("train.val_every=null"))
    validate(make_cfg("train.val_every=7"))


QUICK = ["experiment=seed001_bn", "data.limit_train=3000", "data.val_size=1000", "trainer.max_epochs=2",
         "trainer.accelerator=cpu", "train.eval_batch_sizes=[]", "train.precise_bn=false", "threads=1"]


def test_a_real_run_checks_within_the_epoch_and_logs_fractional_epochs(mlflow_server: str, data_root: str) -> None:
    cfg = make_cfg(*QUICK, "optimizer.lr=0.05", "train.target_acc=0.5", "train.val_every=40",
                   f"data.root={data_root}", f"tracking.uri={mlflow_server}", "tracking.experiment=t_conv")
    result = run_training(cfg)
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    steps_per_epoch = result.history[0]["step"]  # 3000 images in batches of 32
    assert [r["step"] for r in result.history] == [steps_per_epoch, 2 * steps_per_epoch]
    # a check every 40 steps counted from each epoch's start, and one at each epoch's end
    expected = [e * steps_per_epoch + s for e in (0, 1) for s in (*range(40, steps_per_epoch, 40), steps_per_epoch)]
    assert [c["step"] for c in result.checks] == expected
    acc = sorted(client.get_metric_history(result.run_id, "val_acc"), key=lambda m: m.step)
    epoch = sorted(client.get_metric_history(result.run_id, "val_epoch"), key=lambda m: m.step)
    assert [m.step for m in acc] == [m.step for m in epoch] == expected
    assert [m.value for m in epoch] == pytest.approx([c["samples"] / 3000 for c in result.checks])
    assert any(0 < m.value % 1 < 1 for m in epoch)  # fractional epochs
    assert [m.value for m in epoch if m.step % steps_per_epoch == 0] == pytest.approx([1.0, 2.0])
    for key in ("train_loss", "train_acc", "epoch_time_s"):  # an epoch's row at its end-of-epoch check's step
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == [steps_per_epoch,
                                                                                           2 * steps_per_epoch]
    m = run.data.metrics
    first = next(c for c in sorted(acc, key=lambda c: c.step) if c.value >= 0.5)
    assert m["converged"] == 1
    assert m["epochs_to_converge"] == pytest.approx(next(e.value for e in epoch if e.step == first.step))
    assert m["steps_to_converge"] == first.step == result.metrics["steps_to_converge"]
    seen = next(c["samples"] for c in result.checks if c["step"] == first.step)
    assert result.metrics["epochs_to_converge"] == seen / 3000
    assert m["best_val_acc"] == pytest.approx(max(a.value for a in acc)) and m["epochs_run"] == 2
    assert run.data.params["val_every"] == "40" and "s_per_epoch" in m


def test_the_pruner_hears_every_check_at_step_optimizer_steps(data_root: str) -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(
        lower=1.0, n_warmup_steps=60))  # val_acc < 1 always: pruned at the first check from step 60 on
    trial = study.ask()
    cfg = make_cfg(*QUICK, "train.val_every=30", f"data.root={data_root}")
    result = run_training(cfg, callbacks=[CheckPruning(trial)], track=False)
    assert result.outcome == "pruned" and not result.history  # stopped within the first epoch
    assert list(trial.storage.get_trial(trial._trial_id).intermediate_values) == [30, 60]
    assert [c["step"] for c in result.checks] == [30, 60]
    assert result.metrics["epochs_run"] == 0 and "test_acc" not in result.metrics
