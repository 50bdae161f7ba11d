"""One sweep on the 3-node cluster, under the faults of a real cluster (issue #20).

A single PostgreSQL sweep (3 SLURM workers, one per node, its driver waiting in the background) hosts
every fault, each provoked for real: a second driver from another host (while everything else goes on);
the MLflow server stopped for 30 s; then at once on the three workers: ``scontrol requeue`` of one, a
preemption of another by a job of the higher-priority partition, and the third one's node killed
(``slurm-local.sh kill-node``); then PostgreSQL stopped for 30 s. The MLflow outage, in which training
goes on, comes first while most of the sweep is left; the sweep stands still while its three workers
are away and while the database is, so the sweep outlasts the faults on a fast machine too. The tests
run in file order on that one sweep; each asserts what its fault must leave behind, the last one that
the sweep ended exact: each slot one finished trial with one FINISHED run (with its per-check history),
nothing left RUNNING, no traceback in any log, one line per outage.

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
from helpers import ROOT, RunIf, new_database
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from bnsweep.sweep.lock import database_owner
from bnsweep.sweep.slots import live, retried
from bnsweep.sweep.storage import open_storage, sweep_studies

pytestmark = [pytest.mark.cluster, RunIf(slurm=True, postgres=True)]
NAME, SLOTS, EPOCHS, STALE_S, DOWN_S = "c_faults", 40, 30, 20, 30
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
    """The fault sweep, driven in the background: 1 cell x 40 LR slots of 30 epochs (long enough to be hit
    mid-trial on a fast machine), 3 workers."""
    store = tmp_path_factory.mktemp("faults")
    storage = new_database()
    args = ["sweep=tiny", f"sweep.name={NAME}", "sweep.grid={model.bn.placement:[none]}", f"sweep.n_trials={SLOTS}",
            "sweep.repeats=0", f"sweep.epochs={EPOCHS}", f"storage={storage}", f"tracking.uri={cluster_mlflow.uri}",
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
    if getattr(s, "second", None) is not None:
        s.second.kill()
    subprocess.run(["scancel", "-n", f"bnsweep-{NAME}"], capture_output=True, timeout=60)
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    for fault, seconds in s.measured.items():
        print(f"measured ({os.cpu_count()} x {cpu}, load {os.getloadavg()[0]:.1f}): {fault}: {seconds:.1f} s")


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


def given_back_or_retried(s: SimpleNamespace, number: int) -> FrozenTrial | None:
    t = state(s, number)
    return t if t.state.is_finished() and copy_of(s, number) is not None else None


def claims_after(s: SimpleNamespace, job: str, since: float) -> FrozenTrial | None:
    """A trial claimed by a worker of ``job`` after ``since`` (epoch s): the requeued job works again."""
    return next((t for t in trials(s) if (t.user_attrs.get("worker") or {}).get("job") == job
                 and t.user_attrs["worker"]["claimed_at"] > since), None)


def test_second_driver_on_another_host_is_refused(sweep: SimpleNamespace, tmp_path_factory) -> None:
    """Another login node: its own disk (so no common flock), the same PostgreSQL sweep. It runs while the
    faults below go on; the last test reads its answer."""
    victim(sweep, "the second driver")
    other = tmp_path_factory.mktemp("other_host")
    args = [a if not a.startswith("tracking.store_dir=") else f"tracking.store_dir={other}" for a in sweep.args]
    sweep.second = subprocess.Popen([sys.executable, "-m", "bnsweep.sweep", *args], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_mlflow_server_restarted_mid_sweep(sweep: SimpleNamespace) -> None:
    victim(sweep, "the MLflow restart")
    sweep.mlflow.stop()
    time.sleep(DOWN_S)
    start = time.monotonic()
    assert sweep.mlflow.start() == sweep.mlflow.uri
    sweep.measured[f"MLflow down {DOWN_S} s: the restarted server answers after (its own start)"] = (
        time.monotonic() - start)


def test_requeue_preemption_and_node_loss_at_once(sweep: SimpleNamespace) -> None:
    """One worker's job requeued, one preempted, one's node killed, at the same moment (one trial each)."""
    def three() -> list[FrozenTrial] | None:  # each worker's trial with the most epochs still to go
        by_job = {t.user_attrs["worker"]["job"]: t for t in sorted(
            training(sweep), key=lambda t: t.user_attrs["worker"]["claimed_at"])}
        return list(by_job.values()) if len(by_job) == 3 else None

    assert sweep.driver.poll() is None, sweep.log.read_text()[-2000:]
    requeued, preempted, lost = wait_for(three, 300, why="a trial mid-training on each of the 3 workers")
    jobs = {k: t.user_attrs["worker"]["job"] for k, t in
            {"requeue": requeued, "preemption": preempted, "node lost": lost}.items()}
    nodes = {k: node_of(j) for k, j in jobs.items()}
    assert len(set(nodes.values())) == 3, nodes  # one worker per node (LLN=YES spreads them)
    start, wall = time.monotonic(), time.time()
    cpus = sh("sinfo", "-h", "-n", nodes["preemption"], "-o", "%c").split()[0]
    sh("sbatch", "-p", "high", "-w", nodes["preemption"], "-c", cpus, "-J", f"bnsweep-{NAME}-preemptor",
       "-o", "/dev/null", "--wrap", "sleep 3")
    sh("scontrol", "requeue", jobs["requeue"])
    root("bash", str(SCRIPTS / "slurm-local.sh"), "kill-node", nodes["node lost"])
    try:
        for fault, t in (("requeue", requeued), ("preemption", preempted), ("node lost", lost)):
            gone = wait_for(lambda t=t: given_back_or_retried(sweep, t.number), 180, why=f"{fault}: a retry")
            label = f"{fault}: trial retried after" + (f" (stale_after_s={STALE_S})" if fault == "node lost" else "")
            sweep.measured.setdefault(label, time.monotonic() - start)
            assert gone.state == TrialState.FAIL
            copy = copy_of(sweep, t.number)
            assert copy.params.get("optimizer.lr") in (None, t.params["optimizer.lr"])  # the same point
            if fault == "node lost":  # nobody was told: Optuna's heartbeat went stale, the copy is its retry
                assert not gone.user_attrs.get("given_back")
                assert RetryHeartbeatStaleTrialCallback.retried_trial_number(copy) == t.number
            else:  # SIGTERM: handed back by the worker itself, before SLURM's SIGKILL (KillWait, GraceTime)
                assert gone.user_attrs.get("given_back"), fault
    finally:
        root("bash", str(SCRIPTS / "slurm-local.sh"), "start-node", nodes["node lost"])
    for fault in ("requeue", "preemption"):  # the requeued jobs come back and claim again
        wait_for(lambda j=jobs[fault]: claims_after(sweep, j, wall), 240, why=f"{fault}: {jobs[fault]} claims again")
        sweep.measured[f"{fault}: the job claims again after"] = time.monotonic() - start
    assert int(re.search(r"Restarts=(\d+)", sh("scontrol", "show", "job", "-o", jobs["preemption"]))[1]) >= 1


def test_postgresql_restarted_mid_sweep(sweep: SimpleNamespace) -> None:
    victim(sweep, "the database restart")
    failed = {t.number for t in trials(sweep) if t.state == TrialState.FAIL}  # the faults before this one
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
    # the driver's lock went with its connection; it holds it again on a new one
    wait_for(lambda: (database_owner(sweep.storage, NAME) or "").startswith(f"pid {sweep.driver.pid} on "), 60,
             why="the driver to hold the sweep's database lock again")
    sweep.failed_before_pg = failed


def test_sweep_ends_exact_after_every_fault(sweep: SimpleNamespace) -> None:
    assert sweep.driver.wait(900) == 0, sweep.log.read_text()[-3000:]
    out, err = sweep.second.communicate(timeout=600)
    assert sweep.second.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: sweep={NAME}: another driver runs it (pid {sweep.driver.pid} on "), last
    assert "Traceback" not in err

    log = sweep.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert re.search(r"^\| none +\|", log, re.M), log[-2000:]  # the table: a row per cell
    assert log.count(OUTAGE_LINE) == 1, [ln for ln in log.splitlines() if OUTAGE_LINE in ln]  # one line per outage
    workers = {p: p.read_text(errors="replace") for p in (sweep.store / "sweeps" / NAME / "slurm").rglob("*_log.*")}
    assert not [p.name for p, text in workers.items() if "Traceback" in text]
    assert all(text.count(OUTAGE_LINE) <= 1 for text in workers.values())
    assert sum(OUTAGE_LINE in text for text in workers.values()) >= 1  # the workers saw it too, and said so once

    # the database restart retried nothing: the FAIL trials are those of the faults before it
    assert {t.number for t in trials(sweep) if t.state == TrialState.FAIL} == sweep.failed_before_pg
    (study,) = sweep_studies(open_storage(sweep.storage), NAME)
    ts = study.get_trials(deepcopy=False)
    kept = [t for t in ts if live(t, retried(ts))]
    assert sorted(t.user_attrs["slot"] for t in kept) == list(range(SLOTS))  # no slot twice, none missing
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in kept), [t.state for t in kept]
    assert all(t.user_attrs["worker"]["job"] for t in kept)  # every trial ran in a job of the sweep's array
    client = MlflowClient(sweep.mlflow.uri)
    exp = client.get_experiment_by_name(f"sweep-{NAME}")
    runs = client.search_runs([exp.experiment_id], "tags.`bnsweep.role` = 'trial'", max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    finished = {r.data.tags["optuna.trial_id"]: r for r in runs if r.info.status == "FINISHED"}
    assert sorted(finished) == sorted(str(t._trial_id) for t in kept)  # one FINISHED run per slot
    # every completed trial's run holds its whole per-check curve, those trained while MLflow was away
    # included: a trial that started in the outage kept its run on local disk (its worker said so), and the
    # driver sent it, replayed from the outbox
    curves = {t.number: len(client.get_metric_history(finished[str(t._trial_id)].info.run_id, "val_acc"))
              for t in kept if t.state == TrialState.COMPLETE}
    assert all(n >= EPOCHS for n in curves.values()), curves
