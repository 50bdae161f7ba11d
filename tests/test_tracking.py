"""A run's MLflow traffic: the same content in at most 3 requests, and nothing lost on the way (issue #22).

Real parts: the session's `mlflow server` (requests counted in its access log), real training of the default
study's first cell on a MNIST subset, a real unreachable port, a real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT
from mlflow.tracking import MlflowClient

from bnsweep.bench.tracking import RequestLog, cell_config
from bnsweep.tracking import outbox
from bnsweep.tracking.runs import RunTracker, get_or_create_experiment
from bnsweep.tracking.server import check_reachable
from bnsweep.training.run import run_training

TAGS = {"optuna.study": "t/c", "optuna.trial": "0", "bnsweep.role": "trial", "bnsweep.sweep": "t"}
TIMES = {"runtime_s", "eval_time_s", "epoch_time_s", "s_per_epoch"}  # wall-clock numbers: steps compared, not values


def content(client: MlflowClient, run_id: str) -> dict:
    """What the dashboard and the report read of a run: params, tags, every metric's (step, value) curve,
    artifact names and status."""
    run = client.get_run(run_id)
    curves = {k: [(m.step, None if k in TIMES else m.value)
                  for m in sorted(client.get_metric_history(run_id, k), key=lambda m: (m.step, m.timestamp))]
              for k in run.data.metrics}
    return {"params": run.data.params, "tags": {k: v for k, v in run.data.tags.items() if k != "optuna.trial_id"},
            "curves": curves, "artifacts": sorted(a.path for a in client.list_artifacts(run_id)),
            "status": run.info.status}


def test_buffered_run_holds_what_todays_run_holds_in_three_requests(mlflow_server: str, mlflow_store: Path,
                                                                    tmp_path: Path) -> None:
    """Two real trials of the default study's first cell (5,000 images: 3 checks, one epoch, final metrics),
    the same seed: logged as today (``flush_s=0``: a request per ``log``) and buffered. Same run content."""
    client, requests = MlflowClient(mlflow_server), RequestLog(mlflow_store / "server.log")
    check_reachable(mlflow_server)
    got = {}
    for flush_s in (0, 60):
        cfg = cell_config(tmp_path, mlflow_server, limit_train=5000, flush_s=flush_s)
        get_or_create_experiment(client, cfg.tracking.experiment, None)
        requests.take()
        result = run_training(cfg, tags={**TAGS, "optuna.trial_id": str(flush_s)}, background_logging=True)
        result.tracker.close()
        sent = requests.take()
        got[flush_s] = content(client, result.run_id), sent
    (today, today_requests), (buffered, buffered_requests) = got[0], got[60]
    assert len(today["curves"]["val_acc"]) == 3  # checks at steps 78, 156 and the epoch's end
    assert {k: v for k, v in buffered["params"].items() if k != "tracking.flush_s"} == {
        k: v for k, v in today["params"].items() if k != "tracking.flush_s"}
    for key in ("tags", "curves", "artifacts", "status"):
        assert buffered[key] == today[key], key
    assert buffered_requests == {"runs/create": 1, "runs/log-batch": 1, "runs/update": 1}
    assert today_requests["runs/log-batch"] >= 4 and sum(today_requests.values()) >= 6  # 3 checks, epoch, end
    assert not list(outbox.folder(tmp_path).glob("*.jsonl"))  # both runs ended: their outbox files are gone


@pytest.mark.parametrize("offline", [False, True], ids=["away-mid-run", "away-at-start"])
def test_points_logged_while_mlflow_is_unreachable_are_replayed_from_the_outbox(
        mlflow_server: str, tmp_path: Path, monkeypatch, offline: bool) -> None:
    """MLflow away mid-run (its requests fail) or at the run's start (a worker then sends none: ``offline``)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(mlflow_server)
    get_or_create_experiment(client, "t-outbox", None)
    trial_id = f"away-{offline}"
    away = RunTracker("http://127.0.0.1:9", "t-outbox", "away", tags={**TAGS, "optuna.trial_id": trial_id},
                      store_dir=tmp_path, background=True, flush_s=0, offline=offline)  # nothing on port 9
    away.stage(params={"optimizer.lr": 0.1})
    for step in (10, 20, 30):
        away.log({"val_acc": step / 100, "val_loss": 1 / step}, step=step)
    assert outbox.replay(client, tmp_path) == 0  # a live run's file is its own process's to send
    away.finish("FINISHED")
    away.close()  # warns: the server did not answer
    assert len(list(outbox.folder(tmp_path).glob("*.jsonl"))) == 1

    assert outbox.replay(MlflowClient("http://127.0.0.1:8"), tmp_path) == 0  # another server's: left alone
    assert outbox.replay(client, tmp_path, uri="http://127.0.0.1:9") == 1  # MLflow answers again (elsewhere)
    (run,) = client.search_runs([get_or_create_experiment(client, "t-outbox", None)],
                                f"tags.`optuna.trial_id` = '{trial_id}'")
    assert run.info.status == "FINISHED" and run.info.run_name == "away"
    assert run.data.params == {"optimizer.lr": "0.1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_acc")] == [
        (10, 0.1), (20, 0.2), (30, 0.3)]
    assert not list(outbox.folder(tmp_path).glob("*.jsonl"))
    assert outbox.replay(client, tmp_path) == 0  # sent once


def test_a_killed_worker_loses_no_logged_point(mlflow_server: str, tmp_path: Path) -> None:
    """A real SIGKILL after 5 checks that never reached the server (flush_s=60): the outbox still has them."""
    script = textwrap.dedent(f"""
        import sys, time
        from bnsweep.tracking.runs import RunTracker
        t = RunTracker({mlflow_server!r}, "t-killed", "killed", tags={{"optuna.trial_id": "killed"}},
                       store_dir={str(tmp_path)!r}, background=True, flush_s=60)
        for step in range(1, 6):
            t.log({{"val_acc": step / 10}}, step=step)
        print("logged", flush=True)
        time.sleep(300)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "logged"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    client = MlflowClient(mlflow_server)
    assert outbox.replay(client, tmp_path) == 1
    (run,) = client.search_runs([get_or_create_experiment(client, "t-killed", None)],
                                "tags.`optuna.trial_id` = 'killed'")
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert run.info.status == "RUNNING"  # its trial never ended: the driver's recovery ends it KILLED
