"""The dashboards open on the answer: runs table links, cell metrics, system metrics, optuna-dashboard.

All against real parts: the session's `mlflow server`, the tiny sweep run by the real CLI, headless
Chromium rendering MLflow's own UI, and optuna-dashboard serving the sweep's journal.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from helpers import ROOT, RunIf, chromium_exe, runs_by_role, studies_of
from mlflow.tracking import MlflowClient

from bnsweep.sweep.basin import study_basin
from bnsweep.sweep.table import METRIC_COLUMNS, cell_row
from bnsweep.tracking.dashboard import VIEW_TAG, runs_table_url, sweep_links
from bnsweep.tracking.runs import EXPERIMENT_KIND, get_or_create_experiment
from bnsweep.tracking.server import free_port
from bnsweep.tracking.system import system_metrics

CPU = "system/cpu_utilization_percentage"


def sweep_experiment(tiny_sweep):
    return MlflowClient(tiny_sweep.uri).get_experiment_by_name(f"sweep-{tiny_sweep.name}")


def test_sweep_opens_as_model_training_and_prints_its_runs_table(tiny_sweep):
    assert tiny_sweep.result.returncode == 0, tiny_sweep.result.stderr[-2000:]
    exp = sweep_experiment(tiny_sweep)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert VIEW_TAG in exp.tags
    link = runs_table_url(tiny_sweep.uri, exp.experiment_id)
    assert f"#/experiments/{exp.experiment_id}/runs?" in link
    assert f"dashboard: {link}" in tiny_sweep.result.stderr  # at the start
    assert f"dashboard: {link}" in tiny_sweep.result.stdout  # under the table
    assert any(f"sweep-{tiny_sweep.name}" in line and link in line for line in sweep_links(tiny_sweep.uri))


def test_an_experiment_made_before_the_tag_gets_it(mlflow_server):
    client = MlflowClient(mlflow_server)
    made = client.create_experiment("t_untagged")
    assert "mlflow.experimentKind" not in client.get_experiment(made).tags
    assert get_or_create_experiment(client, "t_untagged", None) == made
    assert EXPERIMENT_KIND.items() <= client.get_experiment(made).tags.items()


def test_cell_runs_carry_the_table_as_sortable_metrics(tiny_sweep):
    cells = runs_by_role(tiny_sweep.uri, tiny_sweep.name)["cell"]
    studies = {s.user_attrs["mlflow_parent_run_id"]: s for s in studies_of(tiny_sweep.store, tiny_sweep.name)}
    assert len(cells) == len(studies) == 2
    assert {"basin_width", "best_lr", "test_acc_mean", "epochs_mean", "s_per_epoch"} <= set(METRIC_COLUMNS)
    for run in cells:
        study = studies[run.info.run_id]
        row = cell_row(study, study.user_attrs["target_acc"])
        for key in METRIC_COLUMNS:
            assert key in run.data.metrics and key not in run.data.params, key
            assert run.data.metrics[key] == pytest.approx(row[key], nan_ok=True), key
        # the dashboard's basin is the table's and the report's: the width over every basin seed
        basin = study_basin(study, None, study.user_attrs["target_acc"])
        assert run.data.metrics["basin_width"] == pytest.approx(basin.width.estimate, nan_ok=True)
        assert run.data.metrics["basin_seeds"] == len(basin.brackets)


def test_system_metrics_on_the_summary_run_not_on_trials(tiny_sweep):
    roles = runs_by_role(tiny_sweep.uri, tiny_sweep.name)
    (summary,) = roles["summary"]
    history = MlflowClient(tiny_sweep.uri).get_metric_history(summary.info.run_id, CPU)
    assert history and all(0.0 <= m.value <= 100.0 for m in history)
    assert "system/system_memory_usage_megabytes" in summary.data.metrics
    assert summary.info.status == "FINISHED"
    assert not [k for r in roles["trial"] + roles["cell"] for k in r.data.metrics if k.startswith("system/")]


def test_system_metrics_sampler_ends_with_its_block(mlflow_server):
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(get_or_create_experiment(client, "t_system", None)).info.run_id
    with system_metrics(mlflow_server, run_id, interval_s=0.2):
        deadline = time.monotonic() + 60
        while not client.get_metric_history(run_id, CPU) and time.monotonic() < deadline:
            time.sleep(0.2)
        during = len(client.get_metric_history(run_id, CPU))
    assert during >= 1
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    steps = {m.step for m in client.get_metric_history(run_id, CPU)}
    assert len(steps) > during  # the last, partial interval is sent too
    with system_metrics(mlflow_server, run_id, interval_s=60):  # a block shorter than the interval
        pass
    assert {m.step for m in client.get_metric_history(run_id, CPU)} - steps == {max(steps) + 1}  # resumed
    client.set_terminated(run_id)


def dump_dom(url: str, profile, budget_ms: int) -> str:
    """The page as MLflow's React UI rendered it in headless Chromium after ``budget_ms`` of virtual time."""
    return subprocess.run(
        [chromium_exe(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1400,900", f"--virtual-time-budget={budget_ms}",
         "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout


@RunIf(chromium=True)
def test_runs_page_shows_run_names_and_metric_columns(tiny_sweep, tmp_path):
    link = runs_table_url(tiny_sweep.uri, sweep_experiment(tiny_sweep).experiment_id)
    roles = runs_by_role(tiny_sweep.uri, tiny_sweep.name)
    names = [r.info.run_name for r in roles["cell"] + roles["summary"]]
    wanted = [*names, 'col-id="metrics.`best_val_acc`"', 'col-id="metrics.`best_lr`"']
    for attempt, budget in enumerate((15000, 40000)):  # a loaded machine may need more virtual time
        dom = html.unescape(dump_dom(link, tmp_path / f"profile{attempt}", budget))
        if all(w in dom for w in wanted):
            break
    assert [w for w in wanted if w not in dom] == []
    assert "No data available" not in dom  # not the GenAI overview
    assert not [r.info.run_name for r in roles["trial"] if r.info.run_name in dom]  # trials: one click away


def test_optuna_ui_serves_the_sweeps_studies(tiny_sweep):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bnsweep", "optuna-ui", "--sweep", tiny_sweep.name,
                             "--store-dir", str(tiny_sweep.store), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/dashboard" in first
        deadline, studies = time.monotonic() + 120, None
        while studies is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.load(r)["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies is not None, f"optuna-ui did not answer: {first}"
        assert {s["study_name"] for s in studies} == {
            s.study_name for s in studies_of(tiny_sweep.store, tiny_sweep.name)}
    finally:
        proc.terminate()
        proc.wait(30)


def test_optuna_ui_without_a_journal_says_what_to_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bnsweep", "optuna-ui", "--sweep", "nosuch", "--store-dir",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: sweep=nosuch: no Optuna journal at ")
    assert not (tmp_path / "optuna").exists()  # nothing created for a misspelt name
