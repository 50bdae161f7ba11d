"""Whole sweeps under real faults (issue #14): each provokes one for real, then runs the sweep once more
and checks that nothing was lost: every slot holds exactly one finished trial with exactly one FINISHED
MLflow run, no run is left RUNNING, and there is one `summary` run.

Real parts only: `python -m bnsweep.sweep` drivers, forked workers, a journal file, `mlflow server`s,
real MNIST. Each takes about a minute or more, so they run in `make test-cluster` (marker `cluster`);
none needs SLURM or PostgreSQL.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ROOT, runs_by_role, studies_of, sweep_cli
from optuna.trial import FrozenTrial, TrialState

from bnsweep.sweep.slots import live, retried
from bnsweep.sweep.storage import default_storage
from bnsweep.tracking.server import MlflowServer, free_port

pytestmark = pytest.mark.cluster
N_TRIALS, REPEATS = 2, 1


def sweep_args(name: str, uri: str, store: Path, *extra: str, workers: int = 2, epochs: int = 3) -> list[str]:
    """One cell (BN none) x 2 LR trials + 1 repeat: small, but every kind of slot is there."""
    return ["sweep=tiny", f"sweep.name={name}", f"workers={workers}", "sweep.grid={model.bn.placement:[none]}",
            f"sweep.n_trials={N_TRIALS}", f"sweep.repeats={REPEATS}", f"sweep.epochs={epochs}",
            f"tracking.uri={uri}", f"tracking.store_dir={store}", *extra]


def start_driver(args: list[str], log: Path) -> subprocess.Popen:
    """A driver in the background, as `make sweep` in another terminal."""
    return subprocess.Popen([sys.executable, "-m", "bnsweep.sweep", *args], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})


def trials(store: Path, name: str) -> list[FrozenTrial]:
    if not Path(default_storage(store, name)).exists():
        return []
    return [t for s in studies_of(store, name) for t in s.get_trials(deepcopy=False)]


def wait_for(what: Callable[[], object], timeout: float = 300, every: float = 0.3) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := what():
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def running(store: Path, name: str) -> list[FrozenTrial]:
    return [t for t in trials(store, name) if t.state == TrialState.RUNNING and "worker" in t.user_attrs]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_whole(uri: str, store: Path, name: str, poison_ok: bool = False) -> None:
    """The issue's invariant: each slot one finished trial with one FINISHED run; none RUNNING; one summary."""
    roles = runs_by_role(uri, name)
    every = [r for rs in roles.values() for r in rs]
    assert [r.info.run_name for r in every if r.info.status == "RUNNING"] == []
    assert len(roles.get("summary", [])) == 1
    assert [r.info.status for r in roles["cell"]] == ["FINISHED"]
    for study in studies_of(store, name):
        ts = study.get_trials(deepcopy=False)
        gone = retried(ts)
        held = [t for t in ts if live(t, gone)]
        assert sorted(t.user_attrs["slot"] for t in held) == list(range(N_TRIALS + REPEATS))
        for t in held:
            assert t.state.is_finished(), t
            if poison_ok and t.user_attrs.get("poison"):
                continue
            assert t.state in (TrialState.COMPLETE, TrialState.PRUNED), t.user_attrs.get("error")
            finished = [r for r in roles["trial"] if r.data.tags.get("optuna.study") == study.study_name
                        and r.data.tags.get("bnsweep.cell") and r.info.status == "FINISHED"
                        and r.data.tags["optuna.trial"] in {str(u.number) for u in ts
                                                            if u.user_attrs.get("slot") == t.user_attrs["slot"]}]
            assert [r.data.tags["optuna.trial_id"] for r in finished] == [str(t._trial_id)], t.number


def sweep_runs(uri: str, name: str) -> dict[str, set[str]]:
    """The sweep's cell and summary runs (ids) as they stand: what a driver, not a worker, creates."""
    roles = runs_by_role(uri, name)
    return {role: {r.info.run_id for r in roles.get(role, [])} for role in ("cell", "summary")}


def finish_again(args: list[str]) -> subprocess.CompletedProcess:
    out = sweep_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_mlflow_server_killed_mid_sweep_and_restarted(tmp_path: Path) -> None:
    port = free_port()
    server = MlflowServer(tmp_path / "mlruns", port=port)
    uri = server.start()
    args = sweep_args("f_mlflow", uri, tmp_path / "store")
    driver = start_driver(args, tmp_path / "driver.log")
    try:
        wait_for(lambda: running(tmp_path / "store", "f_mlflow"))
        server.stop()  # the whole process group, as the operator did
        wait_for(lambda: any(t.state.is_finished() and "metrics" in t.user_attrs
                             for t in trials(tmp_path / "store", "f_mlflow")), every=1.0)
        time.sleep(3)
        assert MlflowServer(tmp_path / "mlruns", port=port).start() == uri
        driver.wait(600)
        log = (tmp_path / "driver.log").read_text()
        assert "Traceback" not in log, log[-3000:]
        finish_again(args)
        assert_whole(uri, tmp_path / "store", "f_mlflow")
    finally:
        driver.kill()
        server.stop()


def test_torn_journal_tail_then_resume(mlflow_server: str, tmp_path: Path) -> None:
    args = sweep_args("f_torn", mlflow_server, tmp_path, epochs=1)
    finish_again(args)
    journal = Path(default_storage(tmp_path, "f_torn"))
    journal.write_bytes(journal.read_bytes()[:-11])  # the last append cut mid-line
    out = finish_again(args)
    assert "torn last record" in out.stderr
    assert sweep_cli(*args, "action=status").returncode == 0
    assert_whole(mlflow_server, tmp_path, "f_torn")


def test_two_drivers_of_one_sweep(mlflow_server: str, tmp_path: Path) -> None:
    args = sweep_args("f_two", mlflow_server, tmp_path)
    first = start_driver(args, tmp_path / "first.log")
    try:
        wait_for(lambda: running(tmp_path, "f_two"))
        first.send_signal(signal.SIGSTOP)  # held mid-sweep (its workers go on), so it surely still runs
        try:
            second = sweep_cli(*args)
            before = sweep_runs(mlflow_server, "f_two")
            status = sweep_cli(*args, "action=status")
            after = sweep_runs(mlflow_server, "f_two")
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1].startswith("error: sweep=f_two: another driver runs it (pid ")
        assert status.returncode == 0 and "this is a snapshot" in status.stderr
        assert after == before  # status wrote nothing (the first driver's summary run is its own, from its start)
        assert first.wait(600) == 0
    finally:
        first.kill()
    finish_again(args)
    assert_whole(mlflow_server, tmp_path, "f_two")


def test_sigterm_to_the_driver_stops_workers_and_ends_runs(mlflow_server: str, tmp_path: Path) -> None:
    args = sweep_args("f_term", mlflow_server, tmp_path, epochs=4)
    driver = start_driver(args, tmp_path / "driver.log")
    try:
        got = wait_for(lambda: running(tmp_path, "f_term"))
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(180) != 0
    finally:
        driver.kill()
    assert "Run the same command again to resume" in (tmp_path / "driver.log").read_text()
    pids = {t.user_attrs["worker"]["pid"] for t in trials(tmp_path, "f_term") if "worker" in t.user_attrs}
    assert pids >= {got[0].user_attrs["worker"]["pid"]} and not any(pid_alive(p) for p in pids)  # no orphans
    assert not running(tmp_path, "f_term")  # given back
    roles = runs_by_role(mlflow_server, "f_term")
    assert [r.info.run_name for rs in roles.values() for r in rs if r.info.status == "RUNNING"] == []
    finish_again(args)
    assert_whole(mlflow_server, tmp_path, "f_term")


def test_worker_paused_past_stale_after_s_is_not_retried(mlflow_server: str, tmp_path: Path) -> None:
    args = sweep_args("f_stop", mlflow_server, tmp_path, "stale_after_s=2", epochs=4)
    driver = start_driver(args, tmp_path / "driver.log")
    try:
        victim = wait_for(lambda: running(tmp_path, "f_stop"))[0]
        pid = victim.user_attrs["worker"]["pid"]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(8)  # 4x stale_after_s, and the driver checks every ~5 s
        os.kill(pid, signal.SIGCONT)
        assert driver.wait(600) == 0
    finally:
        driver.kill()
    assert not [t.number for t in trials(tmp_path, "f_stop") if t.user_attrs.get("lost")]
    assert "UpdateFinishedTrialError" not in "".join(
        p.read_text() for p in (tmp_path / "sweeps" / "f_stop").glob("worker-*.log"))
    finish_again(args)
    assert_whole(mlflow_server, tmp_path, "f_stop")


def test_trial_that_always_kills_its_worker_is_ended_as_poison(mlflow_server: str, tmp_path: Path) -> None:
    """The OOM killer, played by the test: each worker that claims slot 0 is SIGKILLed at once."""
    args = sweep_args("f_oom", mlflow_server, tmp_path, workers=1, epochs=2)
    killed: set[int] = set()
    for _ in range(4):
        driver = start_driver(args, tmp_path / "driver.log")
        try:
            while driver.poll() is None:
                for t in running(tmp_path, "f_oom"):
                    if t.user_attrs.get("slot") == 0 and t.number not in killed:
                        os.kill(t.user_attrs["worker"]["pid"], signal.SIGKILL)
                        killed.add(t.number)
                time.sleep(0.2)
        finally:
            driver.kill()
        if any(t.user_attrs.get("poison") for t in trials(tmp_path, "f_oom")):
            break
    assert len(killed) == 3
    finish_again(args)
    poison = [t for t in trials(tmp_path, "f_oom") if t.user_attrs.get("poison")]
    assert len(poison) == 1 and poison[0].state == TrialState.FAIL and poison[0].user_attrs["slot"] == 0
    assert_whole(mlflow_server, tmp_path, "f_oom", poison_ok=True)


def test_disk_full_while_writing_the_journal(mlflow_server: str, tmp_path: Path) -> None:
    """A real EFBIG: the worker's file-size limit (RLIMIT_FSIZE, via prlimit) set to the journal's size."""
    args = sweep_args("f_full", mlflow_server, tmp_path, epochs=4)
    driver = start_driver(args, tmp_path / "driver.log")
    try:
        victim = wait_for(lambda: running(tmp_path, "f_full"))[0]
        pid = victim.user_attrs["worker"]["pid"]
        size = Path(default_storage(tmp_path, "f_full")).stat().st_size
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, size))
        wait_for(lambda: not pid_alive(pid) or None)
        driver.wait(600)
    finally:
        driver.kill()
    logs = "".join(p.read_text() for p in (tmp_path / "sweeps" / "f_full").glob("worker-*.log"))
    assert "error: disk full" in logs
    finish_again(args)
    assert_whole(mlflow_server, tmp_path, "f_full")
