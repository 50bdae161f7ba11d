"""A researcher's own sweep file: given by path, or kept in ./sweeps/ of the folder the command runs from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import studies_of

from bnsweep.defaults import SWEEP_DIR

MINE = """name: {name}
description: my own study
base: [data=mnist, model=mlp, optimizer=sgd, data.limit_train=500]
grid:
  model.activation: [relu, tanh]
search:
  optimizer.lr: {{low: 0.01, high: 1.0, log: true}}
n_trials: 2
epochs: 1
repeats: 0
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnsweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})


def test_a_sweep_file_by_path_runs_from_any_folder(tmp_path: Path, mlflow_server: str) -> None:
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "default.yaml").write_text(MINE.format(name="t_mine"))  # shadows a built-in name
    out = run("sweep", "sweep=studies/default.yaml", "action=status", f"tracking.uri={mlflow_server}",
              f"tracking.store_dir={tmp_path}", cwd=tmp_path)  # status: creates the studies, trains nothing
    assert out.returncode == 0, out.stderr[-2000:]
    studies = studies_of(tmp_path, "t_mine")
    assert sorted(s.study_name for s in studies) == ["t_mine/activation=relu", "t_mine/activation=tanh"]
    assert all(len(s.trials) == 2 for s in studies)
    assert "Table: reports/t_mine/summary.{md,csv}" in out.stdout  # the file's own sweep, not the built-in
    assert not list(tmp_path.glob("bnsweep-sweep-*"))


def test_a_sweep_file_in_the_folders_sweeps_is_found_by_name(tmp_path: Path) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "mine.yaml").write_text(MINE.format(name="t_local"))
    out = run("report", "sweep=mine", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name: t_local" in out.stdout and "description: my own study" in out.stdout
    builtin = run("report", "sweep=tiny", "--cfg", "job", cwd=tmp_path)  # no ./sweeps/tiny.yaml: the built-in
    assert builtin.returncode == 0 and "name: tiny" in builtin.stdout and Path(SWEEP_DIR, "tiny.yaml").is_file()


def test_a_missing_sweep_file_is_one_error_line(tmp_path: Path) -> None:
    out = run("sweep", "sweep=nowhere/mine.yaml", cwd=tmp_path)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"error: sweep=nowhere/mine.yaml is not allowed: no such file; give a sweep file's path or the name of "
        f"one in ./sweeps/ or {SWEEP_DIR}"]
