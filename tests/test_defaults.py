"""One place for each default: the configs hold them, the code reads them, and a worker uses the configured value."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from bnsweep import defaults
from bnsweep.config import compose
from bnsweep.sweep.definition import parse
from bnsweep.sweep.slots import claim, top_up
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
