"""Shared fixtures: real MNIST from the mirror, one real MLflow server per session (plain helpers: helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROOT, sweep_cli

from bnsweep.tracking.server import MlflowServer

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their store explicitly


@pytest.fixture(scope="session")
def data_root() -> str:
    """Where the real datasets are decoded and cached (the project's data/ folder, git-ignored)."""
    return os.environ.get("BNSWEEP_DATA_DIR", str(ROOT / "data"))


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session server's store: its database, artifacts and access log (server.log: requests counted)."""
    return tmp_path_factory.mktemp("mlruns")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_store: Path):
    """A real `mlflow server` on a free loopback port, shared by the session and stopped after."""
    server = MlflowServer(mlflow_store)
    uri = server.start()
    yield uri
    server.stop()


@pytest.fixture(scope="session")
def tiny_sweep(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The `tiny` sweep run once for the session (2 cells x (3 LR trials + 2 repeats), diagnostics on).

    Shared by the sweep tests (exact counts) and the report tests, so the suite pays for it once.
    """
    store = tmp_path_factory.mktemp("tiny_sweep")
    args = ["sweep=tiny", "sweep.name=t_tiny", "workers=2", f"tracking.uri={mlflow_server}",
            f"tracking.store_dir={store}", 'overrides=["train.diagnostics=true","train.diagnostics_every=5"]']
    return SimpleNamespace(name="t_tiny", store=store, uri=mlflow_server, args=args, result=sweep_cli(*args))
