"""A DDP trial on CPU: 2 processes over gloo, rank 0 alone reporting to Optuna and MLflow."""

from __future__ import annotations

from pathlib import Path

from helpers import sweep_cli
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from bnsweep.sweep.storage import default_storage, open_storage, sweep_studies


def test_ddp_trial_on_two_cpu_processes(mlflow_server: str, tmp_path: Path) -> None:
    name = "t_ddp"
    out = sweep_cli("sweep=tiny", f"sweep.name={name}", "workers=1", "sweep.n_trials=1", "sweep.repeats=0",
                    "sweep.grid={model.bn.placement:[before_act]}", 'overrides=["trainer=ddp","trainer.devices=2"]',
                    f"tracking.uri={mlflow_server}", f"tracking.store_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    (study,) = sweep_studies(open_storage(default_storage(tmp_path, name)), name)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(f"sweep-{name}")
    (run,) = client.search_runs([exp.experiment_id], "tags.`bnsweep.role` = 'trial'")
    assert run.info.status == "FINISHED" and run.data.params["trainer.strategy"] == "ddp"
    assert {"test_acc", "best_val_acc", "train_loss"} <= set(run.data.metrics)
    logs = sorted(p.name for p in (tmp_path / "sweeps" / name).glob("worker-*.log"))
    assert logs == ["worker-0-rank0.log", "worker-0-rank1.log"]  # one worker, two processes
    rank1 = (tmp_path / "sweeps" / name / "worker-0-rank1.log").read_text()
    assert "ran 1" in rank1 and "Error" not in rank1  # rank 1 trained the trial too (its shard)
