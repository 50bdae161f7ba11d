"""Sweeps for real: subprocess workers, a journal storage, a real MLflow server, MNIST from the mirror."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROOT, claim_race, make_cfg, runs_by_role, studies_of, sweep_cli
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from bnsweep.defaults import SWEEP_DIR
from bnsweep.errors import ConfigError
from bnsweep.sweep import table
from bnsweep.sweep.basin import study_basin
from bnsweep.sweep.definition import parse
from bnsweep.sweep.slots import best_trial, is_repeat
from bnsweep.sweep.storage import default_storage
from bnsweep.tracking.names import cell_run_name, trial_run_name

SWEEPS = sorted(p.stem for p in Path(SWEEP_DIR).glob("*.yaml"))  # the ones the package ships


# ---------------------------------------------------------------------- definitions


@pytest.mark.parametrize("name", SWEEPS)
def test_every_shipped_sweep_is_valid(name: str) -> None:
    spec = parse(make_cfg(f"sweep={name}", config="run_sweep").sweep)
    assert spec.name == name and spec.cells()


def test_default_sweep_is_what_make_sweep_promises() -> None:
    spec = parse(make_cfg(config="run_sweep").sweep)
    assert spec.grid == {"model.bn.placement": ["none", "before_act", "after_act"],
                         "model.activation": ["sigmoid", "relu"]}
    assert spec.n_trials >= 8 and [p.key for p in spec.params] == ["optimizer.lr"]
    assert spec.params[0].dist.log
    # the bracketing LR search, to 0.25 decade, and 8 paired seeds at each best LR (issue #13)
    assert spec.basin is not None and spec.basin.resolution <= 0.25 and spec.repeats >= 8


def test_placement_x_activation_has_input_only_cells() -> None:
    spec = parse(make_cfg("sweep=placement_x_activation", config="run_sweep").sweep)
    names = [c.name for c in spec.cells()]
    assert len(names) == 20 and "bn=input_only,activation=tanh" in names
    cell = next(c for c in spec.cells() if c.name == "bn=input_only,activation=tanh")
    assert "model.bn.input=true" in cell.overrides and "model.bn.placement=none" in cell.overrides


def raw(**changes) -> dict:
    base = {"name": "t", "base": ["data.limit_train=100"], "grid": {"model.bn.placement": ["none"]},
            "search": {"optimizer.lr": {"low": 1e-3, "high": 1.0, "log": True}}, "n_trials": 2}
    return {**base, **changes}


@pytest.mark.parametrize(("changes", "message"), [
    ({"grid": {"model.bn.placment": ["none"]}}, "sweep.grid: unknown key 'model.bn.placment' (did you mean "
                                                 "model.bn.placement?)"),
    ({"grid": {"model.activation": []}}, "sweep.grid.model.activation=[] is not allowed; give a non-empty list"),
    ({"grid": {"model.activation": ["swish"]}}, "sweep cell activation=swish: model.activation='swish' is not "
                                                 "allowed; choose one of: sigmoid"),
    ({"search": {"optimizer.lr": {"low": 1.0, "high": 0.1}}}, "sweep.search.optimizer.lr: low=1.0 must be below "
                                                             "high=0.1"),
    ({"search": {"optimizer.lr": {"low": 0, "high": 1, "log": True}}}, "low=0 is not allowed with log=true"),
    ({"search": {"optimizer.lr": {"lo": 0.1, "high": 1}}}, "sweep.search.optimizer.lr has unknown field(s) ['lo']"),
    ({"search": {"optimizer.lr": "loguniform"}}, "sweep.search.optimizer.lr='loguniform' is not allowed"),
    ({"search": {"optimizer": {"choices": ["sgd"]}}}, "sweep.search.optimizer: optimizer is a config group"),
    ({"sampler": {"name": "cmaes"}}, "sweep.sampler.name='cmaes' is not allowed; choose one of: tpe, random, grid"),
    ({"pruner": {"name": "asha"}}, "sweep.pruner.name='asha' is not allowed"),
    ({"n_trials": 0}, "sweep.n_trials=0 is not allowed"),
    ({"grids": {}}, "sweep has unknown key(s) ['grids']"),
])
def test_bad_sweep_definition_is_one_clear_error(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(raw(**changes))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_grid_sampler_spreads_the_lr_on_a_log_grid() -> None:
    spec = parse(raw(sampler={"name": "grid"}, n_trials=5,
                     search={"optimizer.lr": {"low": 1e-3, "high": 10.0, "log": True}}))
    lrs = [p["optimizer.lr"] for p in spec.fixed_params()]
    assert [round(math.log10(x), 6) for x in lrs] == [-3, -2, -1, 0, 1]


def test_run_names_are_short_and_say_what_the_run_trained() -> None:
    assert cell_run_name(["before_act", "relu"]) == "before_act · relu" and cell_run_name([]) == "all"
    assert trial_run_name({"optimizer.lr": 10**-1.5}, 1003) == "lr 0.0316 · seed 1003"
    assert trial_run_name({"optimizer.lr": 0.1}, 3, repeat=3) == "repeat 3 · lr 0.1 · seed 3"
    assert (trial_run_name({"optimizer.lr": 0.1, "model.width": 64}, 0, retry=True)
            == "lr 0.1 · width 64 · seed 0 · retry")


# ---------------------------------------------------------------------- exact claiming


def test_parallel_workers_claim_each_enqueued_trial_exactly_once(tmp_path: Path) -> None:
    claim_race(str(tmp_path / "j.journal"), trials=24, workers=3)


# ---------------------------------------------------------------------- real sweeps


def test_tiny_sweep_two_workers_exact_counts(tiny_sweep: SimpleNamespace) -> None:
    out, name, tmp_path, mlflow_server = tiny_sweep.result, tiny_sweep.name, tiny_sweep.store, tiny_sweep.uri
    assert out.returncode == 0, out.stderr[-3000:]
    studies = studies_of(tmp_path, name)
    assert sorted(s.study_name for s in studies) == [f"{name}/placement=before_act", f"{name}/placement=none"]
    for s in studies:
        assert [t.state for t in s.trials] == [TrialState.COMPLETE] * 5
        assert sorted(t.user_attrs["slot"] for t in s.trials) == [0, 1, 2, 3, 4]
        # slots 3, 4: the best LR again with seeds 1, 2; they never become the cell's best LR trial
        best, repeats = best_trial(s.trials), [t for t in s.trials if is_repeat(t)]
        assert not is_repeat(best) and best.number < 3
        assert sorted(t.user_attrs["seed"] for t in repeats) == [1, 2]
        assert all(t.params == best.params and t.user_attrs["repeat_of"] == best.number for t in repeats)
        row = table.cell_row(s, 0.8)
        assert row["complete"] == 3 and row["running"] == 0 and row["best_lr"] == best.params["optimizer.lr"]
    runs = runs_by_role(mlflow_server, name)
    assert len(runs["cell"]) == 2 and len(runs["summary"]) == 1 and len(runs["trial"]) == 10
    assert sorted(r.data.tags.get("bnsweep.repeat", "-") for r in runs["trial"]) == ["-"] * 6 + ["1", "1", "2", "2"]
    parents = {r.info.run_id for r in runs["cell"]}
    client = MlflowClient(mlflow_server)
    for r in runs["trial"]:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] in parents
        assert {"test_acc", "test_acc_precise", "best_val_acc", "epochs_to_converge", "runtime_s"} <= set(
            r.data.metrics)
        assert "test_acc_batch1" not in r.data.metrics  # small-batch evaluation: single runs only
        val_epoch = client.get_metric_history(r.info.run_id, "val_epoch")  # tiny: val_every > one epoch
        assert [m.value for m in val_epoch] == [1.0]
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")] == [val_epoch[0].step]
        assert r.data.tags["optuna.study"].startswith(f"{name}/")
    trial_ids = {(r.data.tags["optuna.study"], int(r.data.tags["optuna.trial"])) for r in runs["trial"]}
    assert len(trial_ids) == 10
    for r in runs["cell"]:
        assert {"best_lr", "best_val_acc", "basin_width", "basin_seeds", "test_acc_mean", "s_per_epoch"} <= set(
            r.data.metrics) and "lr_basin_decades" not in r.data.metrics
        study = next(s for s in studies if s.user_attrs["mlflow_parent_run_id"] == r.info.run_id)
        assert r.data.metrics["basin_width"] == pytest.approx(study_basin(study, None, 0.8).width.estimate, nan_ok=True)
    # run names: a cell's by its grid values, a trial's by its LR and seed; distinct among what the UI lists together
    assert sorted(r.info.run_name for r in runs["cell"]) == ["before_act", "none"]
    for parent in parents:
        names = [r.info.run_name for r in runs["trial"] if r.data.tags["mlflow.parentRunId"] == parent]
        assert len(names) == 5 and len(set(names)) == 5, names
        assert sum(n.startswith("repeat ") for n in names) == 2
        assert all(re.fullmatch(r"(repeat [12] · )?lr [0-9.e-]+ · seed [0-9]+", n) for n in names), names
    names = [r.info.run_name for role in runs.values() for r in role]
    assert len({n for n in names if "trial" in n}) == 0  # no "trial 12" in every cell
    arts = {a.path for a in client.list_artifacts(runs["summary"][0].info.run_id)}
    assert {"summary.csv", "summary.md"} <= arts
    rows = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(
        runs["summary"][0].info.run_id, "summary.csv")).read_text())))
    for row in rows:  # (b) - (a): population statistics minus running averages, at the best LR
        trial = next(r for r in runs["trial"] if r.data.tags["optuna.study"].endswith(row["cell"])
                     and "bnsweep.repeat" not in r.data.tags
                     and float(r.data.params["optimizer.lr"]) == pytest.approx(float(row["best_lr"])))
        m = trial.data.metrics
        assert float(row["precise_bn_gain"]) == pytest.approx(m["test_acc_precise"] - m["test_acc"], abs=1e-9)
    assert "dashboard: http://127.0.0.1" in out.stdout
    # the printed table: <= 8 columns, one row per cell (by its grid values), readable in 100 columns
    printed = out.stdout[out.stdout.index("| cell"):out.stdout.index("\nTable: ")]  # the table and its note
    table_part, note = printed.split("\n\n", 1)
    lines = table_part.splitlines()
    assert len(lines) == 4 and all(line.count("|") <= 9 for line in lines)
    assert len({len(line) for line in lines}) == 1, lines  # aligned: the columns line up in a terminal
    # 100 columns: the note always; the rows' width depends on what the cells got (here 2 x 3 trials, 2 repeats)
    assert all(len(line) <= 100 for line in note.splitlines()) and len(lines[0]) <= 110, printed
    assert re.search(r"^\| none +\|", out.stdout, re.M) and re.search(r"^\| before_act +\|", out.stdout, re.M)
    assert not re.search(r"[-−+]0\.0+\b|±", "\n".join(lines)), lines
    assert [row["label"] for row in rows] == ["none", "before_act"] and {"basin_width", "basin_seeds_closed"} <= set(
        rows[0])

    again = sweep_cli(*tiny_sweep.args)
    assert again.returncode == 0
    assert [len(s.trials) for s in studies_of(tmp_path, name)] == [5, 5]  # nothing repeated
    assert len(runs_by_role(mlflow_server, name)["trial"]) == 10


def test_sigkilled_worker_is_retried_and_resume_completes(mlflow_server: str, tmp_path: Path) -> None:
    args = ["sweep=tiny", "sweep.name=t_kill", "workers=2", "sweep.epochs=3", "sweep.n_trials=3", "sweep.repeats=0",
            'overrides=["data.limit_train=20000"]', f"tracking.uri={mlflow_server}", f"tracking.store_dir={tmp_path}"]
    driver = subprocess.Popen([sys.executable, "-m", "bnsweep.sweep", *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.3)
        if not Path(default_storage(tmp_path, "t_kill")).exists():
            continue
        for s in studies_of(tmp_path, "t_kill"):
            for t in s.get_trials(states=(TrialState.RUNNING,)):
                if "worker" in t.user_attrs and "optimizer.lr" in t.params:
                    victim = (s.study_name, t.number, t.params["optimizer.lr"], t.user_attrs["worker"]["pid"])
    assert victim is not None, "no trial was seen running"
    os.kill(victim[3], signal.SIGKILL)
    driver.communicate(timeout=600)

    out = sweep_cli(*args)  # run again: resumes, completes
    assert out.returncode == 0, out.stderr[-3000:]
    studies = {s.study_name: s for s in studies_of(tmp_path, "t_kill")}
    for s in studies.values():
        live = [t for t in s.trials if not t.user_attrs.get("lost")]
        assert [t.state for t in live] == [TrialState.COMPLETE] * 3
        assert sorted(t.user_attrs["slot"] for t in live) == [0, 1, 2]  # no duplicate
    killed = studies[victim[0]].trials[victim[1]]
    assert killed.state == TrialState.FAIL and killed.user_attrs["lost"]
    retry = [t for t in studies[victim[0]].trials if t.user_attrs.get("retry_of") == victim[1]]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params["optimizer.lr"] == victim[2]  # retried with the same learning rate
    runs = runs_by_role(mlflow_server, "t_kill")["trial"]
    assert sum(r.info.status == "FINISHED" for r in runs) == 6
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)


def test_cli_worker_records_diverging_learning_rates(mlflow_server: str, tmp_path: Path) -> None:
    """`action=status` prepares and enqueues; the stand-alone worker command (as on a cluster) runs it."""
    name = "t_diverge"
    prep = sweep_cli("sweep=tiny", f"sweep.name={name}", "action=status", "sweep.n_trials=2", "sweep.repeats=0",
                     "sweep.grid={model.bn.placement:[none]}",
                     "sweep.search={optimizer.lr:{low:1000,high:10000,log:true}}", f"tracking.uri={mlflow_server}",
                     f"tracking.store_dir={tmp_path}")
    assert prep.returncode == 0, prep.stderr[-3000:]
    (study,) = studies_of(tmp_path, name)
    assert [t.state for t in study.trials] == [TrialState.WAITING] * 2
    worker = subprocess.run([sys.executable, "-m", "bnsweep.worker", "--storage", default_storage(tmp_path, name),
                             "--sweep", name, "--tracking-uri", mlflow_server], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-3000:]
    (study,) = studies_of(tmp_path, name)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert all(t.user_attrs["diverged"] for t in study.trials)
    runs = runs_by_role(mlflow_server, name)["trial"]
    assert len(runs) == 2 and all(r.data.tags["diverged"] == "true" for r in runs)


def test_unreachable_mlflow_server_fails_before_any_training(tmp_path: Path) -> None:
    out = sweep_cli("sweep=tiny", "sweep.name=t_down", "tracking.uri=http://127.0.0.1:9",
                    f"tracking.store_dir={tmp_path}", timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: MLflow tracking server http://127.0.0.1:9 is "
                                                          "not reachable")
    assert not Path(default_storage(tmp_path, "t_down")).exists()


def test_bad_sweep_override_on_the_cli_is_one_line(tmp_path: Path) -> None:
    out = sweep_cli("sweep=tiny", "sweep.sampler.name=cmaes", f"tracking.store_dir={tmp_path}", timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: sweep.sampler.name='cmaes' is not allowed; "
                                  "choose one of: tpe, random, grid, qmc")


def test_the_norm_studies_grid_what_issue_19_asks() -> None:
    """norms: kind x activation; norms_x_batch: kind x batch size with linear LR scaling; depth: kind x depth x
    residual; train_only_norm: what trains."""
    grids = {name: parse(make_cfg(f"sweep={name}", config="run_sweep").sweep)
             for name in ("norms", "norms_x_batch", "depth", "train_only_norm")}
    assert set(grids["norms"].grid) == {"model.norm.kind", "model.activation"}
    assert {"batch", "layer", "group", "ghost_batch", "batch_renorm"} <= set(grids["norms"].grid["model.norm.kind"])
    nxb = grids["norms_x_batch"]
    assert nxb.grid["data.batch_size"] == [2, 4, 16, 64, 256] and "group" in nxb.grid["model.norm.kind"]
    cell = next(c for c in nxb.cells() if c.values == {"model.norm.kind": "batch", "data.batch_size": 2})
    cfg = make_cfg(*cell.overrides)
    assert cfg.data.batch_size == 2 and cfg.optimizer.lr_scaling == "linear" and cfg.optimizer.reference_batch == 32
    depth = grids["depth"].grid
    assert depth["model.depth"] == [2, 8, 32, 64] and depth["model.residual"] == [False, True]
    assert grids["train_only_norm"].grid["train.trainable"] == ["all", "norm_only", "no_norm_affine"]
    assert all(s.basin is not None and s.repeats >= 4 for s in grids.values())
