"""``bnsweep bench --quick``: the sections run (peers included) and print their ratios; no timing asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnsweep", "bench", "--quick", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})


def ratio(out: str, label: str) -> float:
    found = re.search(rf"{re.escape(label)}\s.*?([0-9.]+)x", out)
    assert found, f"no '{label}' ratio in:\n{out}"
    return float(found.group(1))


def rate(out: str, label: str) -> float:
    """The trials/hour printed after ``label``."""
    found = re.search(rf"{re.escape(label)}\s+([0-9]+) trials/hour", out)
    assert found, f"no '{label}' rate in:\n{out}"
    return float(found.group(1))


def agrees(printed: float, a: float, b: float) -> bool:
    """A printed ratio (2 decimals) is a / b of the rates printed beside it (whole trials/hour)."""
    return printed == pytest.approx(a / b, rel=0.02 + 1 / min(a, b), abs=0.006)


def test_population_section_runs_auto_against_fixed_k() -> None:
    out = bench("--only", "population", "--sizes", "1,2", "--cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    auto = re.search(r"population=auto: K=(\d+) after a [0-9.]+ s probe \(K=1 ", out.stdout)
    fixed = re.search(r"ratio auto / best fixed K \(K=(\d+)\)", out.stdout)
    assert auto and fixed, out.stdout
    rates = {int(k): float(r) for k, r in re.findall(r"^  K=(\d+)\s+(\d+) trials/hour", out.stdout, re.M)}
    assert {1, 2, int(auto.group(1))} <= set(rates), out.stdout  # the sizes asked for, and auto's own K
    assert rates[int(fixed.group(1))] == max(rates.values())  # the best fixed K is the fastest measured
    assert agrees(ratio(out.stdout, "ratio auto / best fixed K"), rates[int(auto.group(1))], max(rates.values()))
    assert re.search(r"K=1 .* of matmul peak \(floor [0-9.]+ s\)", out.stdout)


def test_peers_section_prints_both_peers_and_our_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """The canonical Lightning loop and the Optuna + MLflow study really run; the Keras peer says why it was skipped:
    here a Python without TensorFlow, so the Keras run fails and says so while the rest still runs."""
    monkeypatch.delenv("BNSWEEP_KERAS_SKIP", raising=False)
    monkeypatch.setenv("BNSWEEP_KERAS_PYTHON", sys.executable)
    out = bench("--only", "peers")
    assert out.returncode == 0, out.stderr[-3000:]
    assert agrees(ratio(out.stdout, "ratio bnsweep / canonical Lightning"),
                  rate(out.stdout, "bnsweep full stack (run_training)"),
                  rate(out.stdout, "canonical Lightning + torchvision DataLoader"))
    assert agrees(ratio(out.stdout, "ratio bnsweep / Optuna+Lightning+MLflow"),
                  rate(out.stdout, "bnsweep sweep (2 workers)"),
                  rate(out.stdout, "Optuna study.optimize(n_jobs=2) + MLflow fluent"))
    assert "seeds' Keras code: skipped (the Keras run failed" in out.stdout


def test_keras_peer_without_tensorflow_set_up_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnsweep.bench.peers import keras

    monkeypatch.delenv("BNSWEEP_KERAS_PYTHON", raising=False)
    monkeypatch.delenv("BNSWEEP_KERAS_SKIP", raising=False)
    assert "run `make bench-peers`" in keras(1, 1000, "/nowhere")
    monkeypatch.setenv("BNSWEEP_KERAS_SKIP", "TensorFlow could not be installed here")
    assert keras(1, 1000, "/nowhere") == "TensorFlow could not be installed here"


def test_tracking_bench_counts_each_patterns_requests_on_the_server(mlflow_server: str, mlflow_store,
                                                                    tmp_path) -> None:
    """The tracking section's parts, in-process on the session server: simulated trials replay a pattern through
    RunTracker (requests counted in the server's access log), and claimers take every enqueued trial once."""
    import optuna
    from mlflow.tracking import MlflowClient

    from bnsweep.bench.tracking import Pattern, RequestLog, knee, optuna_claims, simulate
    from bnsweep.sweep.storage import open_storage
    from bnsweep.tracking.runs import get_or_create_experiment

    calls = [({"val_acc": 0.5, "val_loss": 0.3, "val_epoch": 0.5}, 78, {"optimizer.lr": "0.1"}, {"device": "cpu"}),
             ({"val_acc": 0.6, "val_loss": 0.2, "val_epoch": 1.0}, 157, {}, {}),
             ({"test_acc": 0.6}, 157, {}, {"outcome": "completed"})]
    pattern = Pattern({"bnsweep.role": "trial"}, calls, {"params_total": 100.0}, {}, "lr 0.1")
    requests = RequestLog(mlflow_store / "server.log")
    per_trial = {}
    for flush_s in (0.0, 60.0):
        get_or_create_experiment(MlflowClient(mlflow_server), f"t-bench-{flush_s:g}", None)
        requests.take()
        trials, ran, wall = simulate(mlflow_server, tmp_path, pattern, threads=2, trial_s=0.2, trials=4,
                                     flush_s=flush_s, experiment=f"t-bench-{flush_s:g}")
        assert trials == ran == 4 and wall > 0.4
        per_trial[flush_s] = sum(requests.take().values()) / trials
    assert per_trial == {0.0: 2 + len(calls), 60.0: 3}  # create + each log (or one flush) + update
    rows = [{"threads": 1, "offered": 1, "sustained": 1.0}, {"threads": 2, "offered": 2, "sustained": 1.5}]
    assert knee(rows).startswith("2 trials at once")

    url = str(tmp_path / "claims.journal")
    done, wall, claim_ms, tell_ms = optuna_claims(url, claimers=3, trials=9)
    assert done == 9
    (study,) = [optuna.load_study(study_name=s, storage=open_storage(url))
                for s in optuna.get_all_study_names(open_storage(url))]
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 9
