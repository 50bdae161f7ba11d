"""One sweep on the 3-node cluster, under the faults of a real cluster, one after another (issue #20).

A single PostgreSQL sweep (3 SLURM workers, one per node, a driver waiting in the background) hosts
every fault in turn, each provoked for real: a second driver from another host, ``scontrol requeue``,
a preemption by a job of the higher-priority partition, a node killed (``slurm-local.sh kill-node``),
PostgreSQL stopped for 30 s, the MLflow server stopped for 30 s. The tests run in file order on that
one sweep; each asserts what its fault must leave behind, and the last one that the sweep ended exact:
each slot one finished trial with one FINISHED run, nothing left RUNNING, no traceback in any log.

Each test prints what it measured (``-s`` shows it): docs/cluster.md's fault table comes from there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROOT, RunIf, new_database, sweep_cli
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from bnsweep.sweep.slots import live, retried
from bnsweep.sweep.storage import open_storage, sweep_studies

pytestmark = [pytest.mark.cluster, RunIf(slurm=True, postgres=True)]
NAME, SLOTS, STALE_S, DOWN_S = "c_faults", 24, 20, 30
SCRIPTS = ROOT / "scripts"
OUTAGE_LINE = "the Optuna storage (PostgreSQL at"


def wait_for(what: Callable[[], object], timeout: float = 300, every: float = 0.5, why: str = "") -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := what():
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {why or what}")


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=check).stdout.strip()


def root(*cmd: str) -> str:
    """A daemon-side action (kill a node, stop the database) as make test-cluster runs the scripts."""
    return sh(*([] if os.geteuid() == 0 else ["sudo", "-E"]), *cmd)


@pytest.fixture(scope="module")
def sweep(cluster_mlflow: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The fault sweep, driven in the background: 1 cell x 24 LR slots of ~10 s, 3 workers."""
    store = tmp_path_factory.mktemp("faults")
    storage = new_database()
    args = ["sweep=tiny", f"sweep.name={NAME}", "sweep.grid={model.bn.placement:[none]}", f"sweep.n_trials={SLOTS}",
            "sweep.repeats=0", "sweep.epochs=5", f"storage={storage}", f"tracking.uri={cluster_mlflow.uri}",
            f"tracking.store_dir={store}", "launcher=slurm", "launcher.workers=3", "launcher.gpus_per_worker=0",
            "launcher.cpus_per_worker=1", "launcher.mem_gb=1", "launcher.time_min=20", "heartbeat_s=2",
            f"stale_after_s={STALE_S}", 'overrides=["data.limit_train=8000"]']
    log = store / "driver.log"
    driver = subprocess.Popen([sys.executable, "-m", "bnsweep.sweep", *args], cwd=ROOT, stdout=log.open("w"),
                              stderr=subprocess.STDOUT)
    s = SimpleNamespace(args=args, storage=storage, store=store, log=log, driver=driver, mlflow=cluster_mlflow,
                        measured={}, db=open_storage(storage))
    yield s
    driver.kill()
    subprocess.run(["scancel", "-n", f"bnsweep-{NAME}"], capture_output=True, timeout=60)
    for fault, seconds in s.measured.items():
        print(f"measured (2-core AMD EPYC, shared): {fault}: {seconds:.1f} s")


def trials(s: SimpleNamespace) -> list[FrozenTrial]:
    return [t for st in sweep_studies(s.db, NAME) for t in st.get_trials(deepcopy=False)]


def training(s: SimpleNamespace) -> list[FrozenTrial]:
    """Trials RUNNING on a worker that has trained at least one epoch of them (so: mid-trial)."""
    return [t for t in trials(s) if t.state == TrialState.RUNNING and "worker" in t.user_attrs
            and t.user_attrs.get("heartbeat", 0) > t.user_attrs["worker"]["claimed_at"]]


def victim(s: SimpleNamespace, why: str) -> FrozenTrial:
    assert s.driver.poll() is None, f"the sweep ended before {why}: {s.log.read_text()[-2000:]}"
    return wait_for(lambda: training(s), 300, why=f"a trial mid-training ({why})")[0]


def state(s: SimpleNamespace, number: int) -> FrozenTrial:
    return next(t for t in trials(s) if t.number == number)


def copy_of(s: SimpleNamespace, number: int) -> FrozenTrial | None:
    """The trial that took over ``number``'s slot (given back or retried from a stale heartbeat)."""
    return next((t for t in trials(s) if number in (
        t.user_attrs.get("retry_of"), RetryHeartbeatStaleTrialCallback.retried_trial_number(t))), None)


def node_of(job: str) -> str:
    return sh("squeue", "-h", "-j", job, "-o", "%N")


def claims_after(s: SimpleNamespace, job: str, since: float) -> FrozenTrial | None:
    """A trial claimed by a worker of ``job`` after ``since`` (epoch s): the requeued job works again."""
    return next((t for t in trials(s) if (t.user_attrs.get("worker") or {}).get("job") == job
                 and t.user_attrs["worker"]["claimed_at"] > since), None)


def test_second_driver_on_another_host_is_refused(sweep: SimpleNamespace, tmp_path: Path) -> None:
    """Another login node: its own disk (so no common flock), the same PostgreSQL sweep."""
    victim(sweep, "the second driver")
    args = [a if not a.startswith("tracking.store_dir=") else f"tracking.store_dir={tmp_path}" for a in sweep.args]
    second = sweep_cli(*args)
    assert second.returncode == 1, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()
    assert last[-1].startswith(f"error: sweep={NAME}: another driver runs it (pid {sweep.driver.pid} on "), last[-3:]
    assert "Traceback" not in second.stderr
    assert sweep.driver.poll() is None  # the first one goes on


def test_scontrol_requeue_gives_the_trial_back_and_the_job_claims_again(sweep: SimpleNamespace) -> None:
    t = victim(sweep, "scontrol requeue")
    job = t.user_attrs["worker"]["job"]
    start, wall = time.monotonic(), time.time()
    sh("scontrol", "requeue", job)
    gone = wait_for(lambda: state(sweep, t.number).state.is_finished() and state(sweep, t.number), 120,
                    why="the requeued worker's trial to be given back")
    sweep.measured["requeue: trial given back after"] = time.monotonic() - start
    assert gone.state == TrialState.FAIL and gone.user_attrs.get("given_back")  # handed back, not killed
    copy = copy_of(sweep, t.number)
    assert copy is not None and copy.params.get("optimizer.lr") in (None, t.params["optimizer.lr"])
    wait_for(lambda: claims_after(sweep, job, wall), 240, why=f"requeued job {job} to claim again")
    sweep.measured["requeue: the job claims again after"] = time.monotonic() - start


def test_preempted_worker_gives_its_trial_back_within_the_grace_time(sweep: SimpleNamespace) -> None:
    t = victim(sweep, "the preemption")
    job = t.user_attrs["worker"]["job"]
    node = node_of(job)
    start, wall = time.monotonic(), time.time()
    cpus = sh("sinfo", "-h", "-n", node, "-o", "%c").split()[0]
    sh("sbatch", "-p", "high", "-w", node, "-c", cpus, "-J", f"bnsweep-{NAME}-preemptor", "-o", "/dev/null",
       "--wrap", "sleep 3")
    gone = wait_for(lambda: state(sweep, t.number).state.is_finished() and state(sweep, t.number), 120,
                    why="the preempted worker's trial to be given back")
    sweep.measured["preemption: trial given back after"] = time.monotonic() - start
    assert gone.state == TrialState.FAIL and gone.user_attrs.get("given_back")  # within the grace time: not killed
    assert copy_of(sweep, t.number) is not None
    wait_for(lambda: claims_after(sweep, job, wall), 240, why=f"preempted job {job} to be requeued and claim again")
    sweep.measured["preemption: the job claims again after"] = time.monotonic() - start
    assert int(re.search(r"Restarts=(\d+)", sh("scontrol", "show", "job", "-o", job))[1]) >= 1


def test_node_killed_its_trial_is_retried_from_the_stale_heartbeat(sweep: SimpleNamespace) -> None:
    t = victim(sweep, "the node's death")
    node = node_of(t.user_attrs["worker"]["job"])
    start = time.monotonic()
    root("bash", str(SCRIPTS / "slurm-local.sh"), "kill-node", node)
    try:
        gone = wait_for(lambda: state(sweep, t.number).state.is_finished() and state(sweep, t.number), 180,
                        why="the dead node's trial to go stale and be retried")
        sweep.measured[f"node lost: trial retried after (stale_after_s={STALE_S})"] = time.monotonic() - start
        assert gone.state == TrialState.FAIL and not gone.user_attrs.get("given_back")  # nobody was told
        copy = copy_of(sweep, t.number)
        assert copy is not None and RetryHeartbeatStaleTrialCallback.retried_trial_number(copy) == t.number
    finally:
        root("bash", str(SCRIPTS / "slurm-local.sh"), "start-node", node)


def test_postgresql_restarted_mid_sweep(sweep: SimpleNamespace) -> None:
    victim(sweep, "the database restart")
    failed = {t.number for t in trials(sweep) if t.state == TrialState.FAIL}
    root("bash", str(SCRIPTS / "pg-local.sh"), "stop")
    time.sleep(DOWN_S)
    root("bash", str(SCRIPTS / "pg-local.sh"), "start")
    start = time.monotonic()
    running = {t.number for t in trials(sweep) if t.state == TrialState.RUNNING}

    def beat_again() -> bool:  # every trial running across the outage beat (or ended) since
        now = time.time()
        return all(t.state.is_finished() or now - t.user_attrs.get("heartbeat", 0) < 8 for t in trials(sweep)
                   if t.number in running)

    wait_for(beat_again, 120, why="the workers to reach the restarted database")
    sweep.measured[f"PostgreSQL down {DOWN_S} s: workers beat again after"] = time.monotonic() - start
    sweep.pg_failed_before = failed


def test_mlflow_server_restarted_mid_sweep(sweep: SimpleNamespace) -> None:
    victim(sweep, "the MLflow restart")
    sweep.mlflow.stop()
    time.sleep(DOWN_S)
    assert sweep.mlflow.start() == sweep.mlflow.uri


def test_sweep_ends_exact_after_every_fault(sweep: SimpleNamespace) -> None:
    assert sweep.driver.wait(900) == 0, sweep.log.read_text()[-3000:]
    log = sweep.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert log.count(OUTAGE_LINE) == 1, [ln for ln in log.splitlines() if OUTAGE_LINE in ln]  # one line per outage
    workers = {p: p.read_text(errors="replace") for p in (sweep.store / "sweeps" / NAME / "slurm").rglob("*_log.*")}
    assert not [p.name for p, text in workers.items() if "Traceback" in text]
    assert all(text.count(OUTAGE_LINE) <= 1 for text in workers.values())
    assert sum(OUTAGE_LINE in text for text in workers.values()) >= 1  # the workers saw it too, and said so once
    # the database restart retried nothing: the FAIL trials are those of the faults before it
    after = {t.number for t in trials(sweep) if t.state == TrialState.FAIL}
    assert after == getattr(sweep, "pg_failed_before", after)

    studies = sweep_studies(open_storage(sweep.storage), NAME)
    (study,) = studies
    ts = study.get_trials(deepcopy=False)
    kept = [t for t in ts if live(t, retried(ts))]
    assert sorted(t.user_attrs["slot"] for t in kept) == list(range(SLOTS))  # no slot twice, none missing
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in kept), [t.state for t in kept]
    client = MlflowClient(sweep.mlflow.uri)
    exp = client.get_experiment_by_name(f"sweep-{NAME}")
    runs = client.search_runs([exp.experiment_id], "tags.`bnsweep.role` = 'trial'", max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["optuna.trial_id"] for r in finished) == sorted(str(t._trial_id) for t in kept)
    metrics = {r.data.tags["optuna.trial_id"]: client.get_run(r.info.run_id).data.metrics for r in finished}
    assert all("best_val_acc" in metrics[str(t._trial_id)] for t in kept if t.state == TrialState.COMPLETE)
    no_history = [t.number for t in kept if "val_acc" not in metrics.get(str(t._trial_id), {"val_acc": 0})]
    print(f"trials whose run has no per-check val_acc history (trained while MLflow was away): {no_history}")
