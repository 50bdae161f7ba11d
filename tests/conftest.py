"""Shared fixtures: Hydra compose, real MNIST from the mirror, one real MLflow server per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from bnsweep.tracking.server import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their store explicitly


def make_cfg(*overrides: str, config: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config, overrides=list(overrides))


@pytest.fixture(scope="session")
def data_root() -> str:
    """Where the real datasets are decoded and cached (the project's data/ folder, git-ignored)."""
    return os.environ.get("BNSWEEP_DATA_DIR", str(ROOT / "data"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on a free loopback port, shared by the session and stopped after."""
    server = MlflowServer(tmp_path_factory.mktemp("mlruns"))
    uri = server.start()
    yield uri
    server.stop()


def sweep_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnsweep.sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})


@pytest.fixture(scope="session")
def tiny_sweep(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The `tiny` sweep run once for the session (2 cells x (3 LR trials + 2 repeats), diagnostics on).

    Shared by the sweep tests (exact counts) and the report tests, so the suite pays for it once.
    """
    store = tmp_path_factory.mktemp("tiny_sweep")
    args = ["sweep=tiny", "sweep.name=t_tiny", "workers=2", f"tracking.uri={mlflow_server}",
            f"tracking.store_dir={store}", 'overrides=["train.diagnostics=true","train.diagnostics_every=5"]']
    return SimpleNamespace(name="t_tiny", store=store, uri=mlflow_server, args=args, result=sweep_cli(*args))
