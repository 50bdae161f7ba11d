"""Cluster sweeps for real: a SLURM cluster of 3 nodes on one machine (with slurmdbd, so sacct works) and PostgreSQL.

`make test-cluster` starts both with scripts/slurm-local.sh and scripts/pg-local.sh, runs these, and
stops them; without those services (a plain `make test`) every test here is skipped.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from helpers import RunIf, claim_race, new_database, sweep_cli  # claim_race: the journal test's race, on PostgreSQL
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from bnsweep.sweep.slots import live, retried
from bnsweep.sweep.storage import open_storage, sweep_studies
from bnsweep.tracking.server import MlflowServer

pytestmark = pytest.mark.cluster
needs_pg = RunIf(postgres=True)  # PG: BNSWEEP_TEST_PG, the server make test-cluster starts
needs_cluster = RunIf(slurm=True, postgres=True)  # one skip line naming whichever is missing


@pytest.fixture(scope="module")
def pg_mlflow(cluster_mlflow: SimpleNamespace) -> str:
    """The cluster's MLflow server (conftest.py): basic auth, beyond loopback, its store in PostgreSQL."""
    return cluster_mlflow.uri


def slurm_args(name: str, storage: str, uri: str, store: Path, *extra: str) -> list[str]:
    """2 cells x 4 trials, no repeats, as a 2-worker array on CPU."""
    return ["sweep=tiny", f"sweep.name={name}", "sweep.n_trials=4", "sweep.repeats=0", f"storage={storage}",
            f"tracking.uri={uri}", f"tracking.store_dir={store}", "launcher=slurm", "launcher.workers=2",
            "launcher.gpus_per_worker=0", "launcher.cpus_per_worker=1", "launcher.mem_gb=1", "launcher.time_min=10",
            *extra]


def trial_runs(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"sweep-{name}")
    return client.search_runs([exp.experiment_id], "tags.`bnsweep.role` = 'trial'", max_results=1000)


def assert_exact(storage: str, uri: str, name: str) -> list[optuna.Study]:
    studies = sweep_studies(open_storage(storage), name)
    assert len(studies) == 2
    for s in studies:
        gone = retried(s.trials)
        kept = [t for t in s.trials if live(t, gone)]
        assert [t.state for t in kept] == [TrialState.COMPLETE] * 4
        assert sorted(t.user_attrs["slot"] for t in kept) == [0, 1, 2, 3]  # no slot twice, none missing
    runs = trial_runs(uri, name)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 8 and all(r.data.tags.get("mlflow.parentRunId") for r in finished)
    assert len({(r.data.tags["optuna.study"], r.data.tags["optuna.trial"]) for r in finished}) == 8
    return studies


@needs_cluster
def test_slurm_array_of_two_workers_exact_counts(pg_mlflow: str, tmp_path: Path) -> None:
    storage = new_database()
    out = sweep_cli(*slurm_args("c_array", storage, pg_mlflow, tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    studies = assert_exact(storage, pg_mlflow, "c_array")
    jobs = {t.user_attrs["worker"]["job"] for s in studies for t in s.trials}
    assert None not in jobs and 1 <= len(jobs) <= 2  # trials ran in the array's jobs
    assert len(trial_runs(pg_mlflow, "c_array")) == 8
    assert re.search(r"^\| none +\|", out.stdout, re.M), out.stdout[-2000:]  # the table: a row per cell


@needs_cluster
def test_cancelled_worker_trial_is_retried_and_sweep_completes(pg_mlflow: str, tmp_path: Path) -> None:
    """Detach, scancel one worker mid-trial, re-attach: Optuna's heartbeat retries the trial."""
    storage = new_database()
    args = slurm_args("c_cancel", storage, pg_mlflow, tmp_path, "sweep.epochs=4", "heartbeat_s=2",
                      "stale_after_s=10", 'overrides=["data.limit_train=20000"]')
    out = sweep_cli(*args, "launcher.wait=false")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "action=status" in out.stderr
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline:
        time.sleep(0.5)
        for s in sweep_studies(open_storage(storage), "c_cancel"):
            for t in s.get_trials(states=(TrialState.RUNNING,)):
                if "optimizer.lr" in t.params:
                    victim = (s.study_name, t.number, t.params["optimizer.lr"], t.user_attrs["worker"]["job"])
    assert victim is not None, "no trial was seen running"
    subprocess.run(["scancel", victim[3]], check=True, timeout=60)

    again = sweep_cli(*args, "action=status")  # re-attach: follows the other worker to the end
    assert again.returncode == 0, again.stderr[-3000:]
    studies = {s.study_name: s for s in assert_exact(storage, pg_mlflow, "c_cancel")}
    killed = studies[victim[0]].trials[victim[1]]
    assert killed.state == TrialState.FAIL
    # Either the worker saw the scancel and gave its slot back at once (attribute `lost`, then retry_of),
    # or it died silently and Optuna's heartbeat went stale (RetryHeartbeatStaleTrialCallback's copy).
    (copy,) = [t for t in studies[victim[0]].trials if victim[1] in (
        t.user_attrs.get("retry_of"), RetryHeartbeatStaleTrialCallback.retried_trial_number(t))]
    assert copy.state == TrialState.COMPLETE and copy.params["optimizer.lr"] == victim[2]  # same LR, retried
    # the cancelled attempt's run, if it got as far as its first epoch's tags, ended KILLED; none left RUNNING
    statuses = sorted(r.info.status for r in trial_runs(pg_mlflow, "c_cancel"))
    assert statuses.count("FINISHED") == 8 and set(statuses) <= {"FINISHED", "KILLED"}, statuses
    client = MlflowClient(pg_mlflow)
    exp = client.get_experiment_by_name("sweep-c_cancel")
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


@needs_pg
def test_postgresql_two_workers_never_claim_the_same_trial() -> None:
    claim_race(new_database(), trials=30, workers=2)


def test_mlflow_basic_auth_takes_credentials_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    """tracking.auth: the server's admin is the env's user; no credentials, no access; the password is never logged."""
    import urllib.error
    import urllib.request

    secret = f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "sweeper")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    server = MlflowServer(tmp_path, auth=True)
    uri = server.start()
    try:
        assert uri.startswith("http://127.0.0.1:")
        assert MlflowClient(uri).create_experiment("auth-check")  # credentials from the environment
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert e.value.code == 401
    finally:
        server.stop()
    assert not any(secret in p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
                   and p.suffix in (".log", ".ini", ".url", ".pid"))


@needs_pg
def test_database_lock_refuses_a_second_driver_and_dies_with_its_holder() -> None:
    """The advisory lock of a PostgreSQL sweep: a second holder is refused with one line naming the first;
    the holder's process SIGKILLed (its host gone), PostgreSQL drops the lock with its connection."""
    import signal
    import sys

    from bnsweep.errors import ConfigError
    from bnsweep.sweep.lock import database_owner, holding_database

    url, name = new_database(), f"lock-{uuid.uuid4().hex[:6]}"
    code = (f"import time; from bnsweep.sweep.lock import holding_database\nwith holding_database({url!r}, "
            f"{name!r}):\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert database_owner(url, name).startswith(f"pid {holder.pid} on ")
        with pytest.raises(ConfigError, match=rf"^sweep={name}: another driver runs it \(pid {holder.pid} on "), \
                holding_database(url, name):
            pass
        assert database_owner(url, f"{name}-other") is None  # a lock per sweep
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        deadline = time.monotonic() + 30  # the server notices the closed connection at once, or nearly
        while database_owner(url, name) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        with holding_database(url, name):
            assert database_owner(url, name).startswith("pid ")
    finally:
        holder.kill()
