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
    rates = {k: rate(out.stdout, f"K={k}") for k in (1, 2)}
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
