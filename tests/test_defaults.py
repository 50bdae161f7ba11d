"""One place for each default: the configs hold them, the code reads them, and a worker uses the configured value."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from bnsweep import defaults
from bnsweep.config import compose, instantiate
from bnsweep.errors import ConfigError
from bnsweep.population import auto
from bnsweep.sweep.definition import parse
from bnsweep.sweep.slots import HOST, claim, live, recover_study, top_up
from bnsweep.sweep.state import open_sweep
from bnsweep.sweep.storage import open_storage
from bnsweep.sweep.worker import Worker

RAW = {"name": "d", "base": ["data.limit_train=100"], "grid": {"model.bn.placement": ["none"]},
       "search": {"optimizer.lr": {"low": 1e-3, "high": 1.0, "log": True}}, "sampler": {"name": "grid"},
       "n_trials": 2, "repeats": 1}


@pytest.mark.parametrize("config", ["train", "run_sweep", "report"])
def test_every_command_keeps_its_results_in_the_same_store(config: str) -> None:
    assert compose(config).tracking.store_dir == defaults.STORE_DIR == "mlruns"


def test_sweep_defaults_are_read_from_the_sweep_config() -> None:
    cfg = compose("run_sweep")
    assert (cfg.heartbeat_s, cfg.stale_after_s) == (defaults.HEARTBEAT_S, defaults.STALE_AFTER_S)
    assert Path(defaults.CONF_DIR, "sweep", "default.yaml").is_file()  # the configs ship inside the package


def test_a_worker_waits_for_a_running_lr_trial_only_until_it_is_stale(tmp_path: Path) -> None:
    """Repeats wait for the cell's last LR trial; once that trial is silent for the *configured*
    ``stale_after_s`` it counts as lost (the driver retries it), so the worker must stop waiting.
    (The worker once checked against the built-in 900 s instead and waited on.)"""
    spec, url = parse(RAW), str(tmp_path / "d.journal")
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="d/c", direction="maximize")
    for key, value in spec.to_attrs().items():
        study.set_user_attr(key, value)
    top_up(study, spec)
    done = claim(storage, study)
    done.suggest_float("optimizer.lr", 1e-3, 1.0, log=True)
    study.tell(done, 0.9)
    running = claim(storage, study)  # the last LR trial, held by a worker on another node
    assert running is not None and claim(storage, study) is None  # the repeat waits for it
    # On this host a live PID keeps its trial (a paused worker is not lost); elsewhere only the heartbeat tells.
    storage.set_trial_user_attr(running._trial_id, "worker", {"host": "node-b", "pid": 1, "claimed_at": time.time()})

    impatient = Worker(url, "d", "http://127.0.0.1:9", stale_after_s=60)
    patient = Worker(url, "d", "http://127.0.0.1:9")  # the default, from conf/run_sweep.yaml
    assert impatient.must_wait() and patient.must_wait()  # a fresh heartbeat: it may still finish
    storage.set_trial_user_attr(running._trial_id, "heartbeat", time.time() - 120)  # silent for 2 minutes
    assert not impatient.must_wait()
    assert patient.must_wait() and defaults.STALE_AFTER_S > 120


def test_service_limits_are_read_from_the_configs() -> None:
    """MAX_LOST, STOP_WAIT_S, the respawn cap, MLflow's request retries and timeout, SLURM's polling and
    command timeouts and the population probe live in conf/, and the code uses exactly those values."""
    cfg = compose("run_sweep")
    assert (cfg.max_lost, cfg.stop_wait_s, cfg.respawns_per_worker) == (
        defaults.MAX_LOST, defaults.STOP_WAIT_S, defaults.RESPAWNS_PER_WORKER)
    assert (cfg.tracking.request_retries, cfg.tracking.request_timeout_s) == (
        defaults.REQUEST_RETRIES, defaults.REQUEST_TIMEOUT_S)
    slurm = instantiate(compose("run_sweep", ["launcher=slurm", "launcher.poll_s=7"]).launcher)
    assert (slurm.poll_s, slurm.command_timeout_s) == (7, defaults.SLURM_COMMAND_TIMEOUT_S)
    probe = cfg.population_probe
    used = (auto.CPU_CANDIDATES, auto.GPU_CANDIDATES, auto.MARGIN, auto.PROBE_STEPS, auto.SHORTLIST)
    assert used == (tuple(probe.cpu_candidates), tuple(probe.gpu_candidates), probe.margin, probe.steps,
                    probe.shortlist)


@pytest.mark.parametrize(("override", "message"), [
    ("max_lost=0", "max_lost=0 is not allowed"),
    ("stop_wait_s=-1", "stop_wait_s=-1"),
    ("respawns_per_worker=1.5", "respawns_per_worker=1.5 is not allowed; it must be an integer"),
    ("launcher=slurm", "launcher.poll_s=0"),
])
def test_a_bad_service_limit_is_one_error_naming_it(override: str, message: str) -> None:
    extra = ["launcher.poll_s=0"] if override == "launcher=slurm" else []
    cfg = compose("run_sweep", ["sweep=tiny", "tracking.uri=http://127.0.0.1:9", override, *extra])
    with pytest.raises(ConfigError, match=re.escape(message)):
        open_sweep(cfg)


def test_max_lost_from_the_config_decides_when_a_slot_is_poison(tmp_path: Path) -> None:
    """With max_lost=1 one worker killed by its trial ends the slot; the default retries it."""
    spec = parse(RAW | {"repeats": 0, "n_trials": 1})
    storage = open_storage(str(tmp_path / "d.journal"))
    studies = []
    for name in ("d/strict", "d/default"):
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
        for key, value in spec.to_attrs().items():
            study.set_user_attr(key, value)
        top_up(study, spec)
        trial = claim(storage, study)
        dead = subprocess.Popen(["true"])
        dead.wait()  # a worker of this host whose process is gone: its trial is lost
        storage.set_trial_user_attr(trial._trial_id, "worker", {"host": HOST, "pid": dead.pid,
                                                                "claimed_at": time.time()})
        studies.append(study)
    strict, default = studies
    recover_study(storage, strict, 900, max_lost=1)
    recover_study(storage, default, 900)
    assert [t.user_attrs.get("poison") for t in strict.get_trials() if live(t)] == [1]
    assert [t.state for t in default.get_trials() if live(t)] == [optuna.trial.TrialState.WAITING]
    assert defaults.MAX_LOST > 1
