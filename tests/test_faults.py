"""Faults a shared sweep meets, provoked for real on a real Optuna journal (the quick ones; whole sweeps
under fire are in tests/cluster/test_faults_cluster.py): a torn journal tail, two drivers, a trial
that keeps killing its worker, a paused worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from bnsweep.defaults import MAX_LOST
from bnsweep.errors import ConfigError
from bnsweep.sweep.definition import parse
from bnsweep.sweep.lock import holding, lock_path, owner
from bnsweep.sweep.slots import HOST, claim, give_back, is_lost, live, recover_study
from bnsweep.sweep.storage import open_storage

SPEC = {"name": "f", "base": [], "grid": {"model.bn.placement": ["none"]},
        "search": {"optimizer.lr": {"low": 0.01, "high": 1.0, "log": True}},
        "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"}, "n_trials": 2, "epochs": 1,
        "repeats": 0}


def cell_study(url: str, n_trials: int = 2) -> optuna.Study:
    """A real cell study in a journal, prepared as the driver does (attributes, slots enqueued)."""
    spec = parse({**SPEC, "n_trials": n_trials}, [])
    study = optuna.create_study(storage=open_storage(url), study_name="f/c", direction="maximize")
    for k, v in spec.to_attrs().items():
        study.set_user_attr(k, v)
    recover_study(study._storage, study, 900)
    return study


def test_torn_journal_tail_is_cut_with_a_backup_and_the_sweep_reads_on(tmp_path: Path, caplog) -> None:
    url = str(tmp_path / "optuna" / "f.journal")
    study = cell_study(url)
    trial = claim(study._storage, study)
    study.tell(trial, 0.5)
    journal = Path(url)
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-9])  # the last record torn mid-line, as by a crash or a full disk
    with caplog.at_level("WARNING", logger="bnsweep.storage"):
        storage = open_storage(url)
    assert "torn last record" in caplog.text
    assert Path(f"{url}.torn-1").read_bytes() == whole[:-9]  # the file as it was is kept
    assert journal.read_bytes().endswith(b"\n")
    again = optuna.load_study(study_name="f/c", storage=storage)
    # the tell is what was torn: the trial is RUNNING again, of this (live) process, so not lost yet
    assert [t.state for t in again.trials].count(TrialState.RUNNING) == 1
    again.tell(again.trials[trial.number].number, 0.5)  # appends go on after the cut: readable again
    assert optuna.load_study(study_name="f/c", storage=open_storage(url)).trials[trial.number].value == 0.5


def test_second_driver_gets_one_line_and_status_reads_without_the_lock(tmp_path: Path) -> None:
    path = lock_path(tmp_path, "s")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from bnsweep.sweep.lock import holding\n"
        f"with holding(Path({str(path)!r}), 's'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"pid {holder.pid}" in (owner(path) or "")
        with pytest.raises(ConfigError, match=f"sweep=s: another driver runs it \\(pid {holder.pid} "), \
                holding(path, "s"):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert owner(path) is None  # the kernel dropped the lock with its holder: no stale file to delete
    with holding(path, "s"):
        assert owner(path) is not None


def test_a_trial_that_keeps_killing_its_worker_is_ended_as_poison(tmp_path: Path) -> None:
    url = str(tmp_path / "f.journal")
    study = cell_study(url, n_trials=1)
    storage = study._storage
    for _ in range(MAX_LOST):  # a real worker process claims slot 0 and is SIGKILLed (the OOM killer)
        code = ("import optuna, os, signal; from bnsweep.sweep.storage import open_storage; "
                "from bnsweep.sweep.slots import claim\n"
                f"s = open_storage({url!r}); st = optuna.load_study(study_name='f/c', storage=s)\n"
                "t = claim(s, st)\nos.kill(os.getpid(), signal.SIGKILL)")
        assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
        recover_study(storage, study, 900)
    trials = study.get_trials()
    lost = [t for t in trials if not live(t)]
    assert len(lost) == MAX_LOST and {t.user_attrs["slot"] for t in lost} == {0}
    poison = [t for t in trials if t.user_attrs.get("poison")]
    assert len(poison) == 1 and poison[0].state == TrialState.FAIL and poison[0].user_attrs["slot"] == 0
    assert "died 3 times" in poison[0].user_attrs["error"]
    assert poison[0].params == lost[-1].params  # the LR that kills it, for the researcher to see
    assert recover_study(storage, study, 900)[1] == 0  # not retried again, and the slot counts as done


def test_trials_given_back_by_a_stopped_worker_never_make_poison(tmp_path: Path) -> None:
    study = cell_study(str(tmp_path / "f.journal"), n_trials=1)
    storage = study._storage
    for _ in range(MAX_LOST + 1):  # Ctrl-C'd again and again: each time the trial is given back
        give_back(storage, study, claim(storage, study))
        recover_study(storage, study, 900)
    assert not [t for t in study.get_trials() if t.user_attrs.get("poison")]
    assert [t.state for t in study.get_trials() if live(t)] == [TrialState.WAITING]
    assert [t.user_attrs["slot"] for t in study.get_trials() if live(t)] == [0]


def test_a_paused_worker_on_this_host_is_not_lost_a_dead_one_is(tmp_path: Path) -> None:
    study = cell_study(str(tmp_path / "f.journal"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)  # suspended far past stale_after_s
        trial = claim(study._storage, study)
        trial.set_user_attr("worker", {"host": HOST, "pid": sleeper.pid, "claimed_at": 0.0})
        trial.set_user_attr("heartbeat", 0.0)  # its last beat was long ago
        frozen = study.trials[trial.number]
        assert not is_lost(frozen, stale_after_s=1, now=time.time())
        os.kill(sleeper.pid, signal.SIGCONT)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert is_lost(study.trials[trial.number], stale_after_s=1e9)  # a dead PID is caught at once
