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


def test_population_section_runs_auto_against_fixed_k() -> None:
    out = bench("--only", "population", "--sizes", "1,2", "--cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"population=auto: K=\d+ after a [0-9.]+ s probe \(K=1 ", out.stdout), out.stdout
    assert ratio(out.stdout, "ratio auto / best fixed K") > 0
    assert re.search(r"K=1 .* of matmul peak \(floor [0-9.]+ s\)", out.stdout)


@pytest.mark.parametrize("keras", ["unset", "broken"])
def test_peers_section_prints_both_peers_and_our_ratio(keras: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The canonical Lightning loop and the Optuna + MLflow study really run; the Keras peer says why it was skipped."""
    monkeypatch.delenv("BNSWEEP_KERAS_PYTHON", raising=False)
    monkeypatch.delenv("BNSWEEP_KERAS_SKIP", raising=False)
    if keras == "broken":  # a Python without TensorFlow: the Keras peer fails and says so, the rest still runs
        monkeypatch.setenv("BNSWEEP_KERAS_PYTHON", sys.executable)
    out = bench("--only", "peers")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ratio(out.stdout, "ratio bnsweep / canonical Lightning") > 0
    assert ratio(out.stdout, "ratio bnsweep / Optuna+Lightning+MLflow") > 0
    assert re.search(r"Optuna study.optimize\(n_jobs=2\) \+ MLflow fluent\s+\d+ trials/hour", out.stdout)
    skipped = "run `make bench-peers`" if keras == "unset" else "the Keras run failed"
    assert f"seeds' Keras code: skipped ({skipped}" in out.stdout
