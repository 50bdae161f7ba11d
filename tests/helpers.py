"""What test modules share, other than fixtures: ``from helpers import ...`` (never from conftest or a test module).

Importing one test module from another runs its collection-time code twice and ties unrelated files
together; fixtures stay in conftest.py, plain functions and constants live here.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from bnsweep.config import compose
from bnsweep.sweep.storage import default_storage, open_storage, sweep_studies

ROOT = Path(__file__).resolve().parents[1]  # the checkout: where the CLIs run and must leave no outputs/
PG = os.environ.get("BNSWEEP_TEST_PG", "postgresql://postgres@127.0.0.1:54329/ci")  # make test-cluster's server


def make_cfg(*overrides: str, config: str = "train") -> DictConfig:
    """A config composed from the package's conf/, as ``bnsweep <command>`` would from any folder."""
    return compose(config, overrides)


def sweep_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m bnsweep.sweep`` as a real process; few MLflow retries so a dead server fails fast."""
    return subprocess.run([sys.executable, "-m", "bnsweep.sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})


def studies_of(store: Path, name: str) -> list[optuna.Study]:
    """The Optuna studies (one per cell) of sweep ``name`` in its default journal under ``store``."""
    return sweep_studies(open_storage(default_storage(store, name)), name)


def runs_by_role(uri: str, name: str) -> dict[str, list]:
    """A sweep's MLflow runs grouped by their ``bnsweep.role`` tag (trial, cell, summary, ...)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"sweep-{name}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags.get("bnsweep.role", "?"), []).append(r)
    return out


def _claim_all(url: str, name: str, queue) -> None:
    """One racing worker: claim until nothing is left, then report what it got (runs in a spawned process)."""
    from bnsweep.sweep.slots import claim

    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    got = []
    while (trial := claim(storage, study)) is not None:
        got.append(trial.number)
    queue.put(got)


def claim_race(url: str, trials: int, workers: int) -> None:
    """``workers`` processes claim one study's ``trials`` enqueued trials at once: each exactly once.

    Shared by the journal test and the PostgreSQL cluster test, so both storages face the same race.
    """
    study = optuna.create_study(storage=open_storage(url), study_name="s/c")
    for _ in range(trials):
        study.enqueue_trial({})
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, "s/c", queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    claimed = [n for _ in procs for n in queue.get(timeout=120)]
    for p in procs:
        p.join(30)
    assert sorted(claimed) == list(range(trials))
    assert len(optuna.load_study(study_name="s/c", storage=open_storage(url)).trials) == trials


# ---------------------------------------------------------------------- RunIf: skip with one reason


def chromium_exe() -> str | None:
    """The headless Chromium the report test renders with, if one is on PATH."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _slurm() -> bool:
    return bool(shutil.which("sinfo") and os.environ.get("SLURM_CONF")) and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


def new_database() -> str:
    """A fresh database on the test PostgreSQL server (``PG``), for one storage or MLflow store."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return PG.rsplit("/", 1)[0] + f"/{name}"


def postgres_up() -> bool:
    """Whether the test PostgreSQL (``PG``) accepts a connection within 3 s."""
    try:
        import psycopg

        psycopg.connect(PG, connect_timeout=3).close()
        return True
    except Exception:
        return False


_NEEDS = {  # condition: (is it here?, the one-line reason when it is not)
    "gpu": (_gpu, "needs a CUDA GPU (torch.cuda.is_available() is false here)"),
    "chromium": (lambda: chromium_exe() is not None,
                 "needs headless Chromium (chromium or chromium-browser on PATH); .ci/run installs it"),
    "slurm": (_slurm, "needs a SLURM cluster (sinfo answering, SLURM_CONF set); make test-cluster starts one"),
    "postgres": (postgres_up, f"needs PostgreSQL at {PG} (BNSWEEP_TEST_PG); make test-cluster starts one"),
}


def RunIf(*, gpu: bool = False, chromium: bool = False, slurm: bool = False,
          postgres: bool = False) -> pytest.MarkDecorator:
    """A ``skipif`` mark for tests that need something a plain ``make test`` machine may lack.

    Only the requested conditions are probed (no torch import for ``chromium=True``); the reason names
    each one missing and how to get it, on one line, so ``pytest -ra`` says why a test did not run.
    """
    wanted = {"gpu": gpu, "chromium": chromium, "slurm": slurm, "postgres": postgres}
    missing = [reason for name, (present, reason) in _NEEDS.items() if wanted[name] and not present()]
    return pytest.mark.skipif(bool(missing), reason=" | ".join(missing) or "all requirements met")


def bnsweep_cli(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m bnsweep <command> ...`` as a researcher runs it (a real process, from ``cwd``)."""
    return subprocess.run([sys.executable, "-m", "bnsweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})


def assert_one_line_error(result: subprocess.CompletedProcess, *parts: str) -> str:
    """The command failed with exactly one ``error:`` line naming ``parts``, and no traceback."""
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def tiny_population_sweep(uri: str, store: Path, name: str, population: int | str) -> list[optuna.Study]:
    """The tiny sweep (2 cells x 5 trials) with ``population`` through the real driver, one worker, a journal
    and the MLflow server at ``uri``: its studies, each checked to hold 5 completed trials."""
    out = sweep_cli("sweep=tiny", f"sweep.name={name}", "workers=1", f"population={population}",
                    f"tracking.uri={uri}", f"tracking.store_dir={store}")
    assert out.returncode == 0, out.stderr[-3000:]
    studies = studies_of(store, name)
    assert len(studies) == 2
    for s in studies:
        assert s.user_attrs["population"] == population
        assert [t.state for t in s.trials] == [optuna.trial.TrialState.COMPLETE] * 5
    return studies
