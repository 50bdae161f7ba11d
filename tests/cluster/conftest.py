"""The cluster tests' shared MLflow server: one for the session, as a cluster's users would share one.

Basic auth on (credentials from the environment, as every worker gets them), bound to this machine's
network address rather than loopback (the nodes dial it), its store in the test PostgreSQL server.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from helpers import PG, new_database, postgres_up

from bnsweep.tracking.server import MlflowServer


def network_address() -> str | None:
    """This machine's first non-loopback IPv4 address (``hostname -I``), or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except OSError:
        return None
    return next((a for a in out if "." in a and not a.startswith("127.")), None)


@pytest.fixture(scope="session")
def cluster_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """``uri``, and ``restart(down_s)`` for the MLflow-outage test (same port, same stores)."""
    if not postgres_up():
        pytest.skip(f"no PostgreSQL at {PG}")
    host = network_address()
    if host is None:
        pytest.skip("no non-loopback network address on this machine (hostname -I)")
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", "sweeper")
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", f"pw-{uuid.uuid4().hex}")
    store, backend = tmp_path_factory.mktemp("mlruns_cluster"), new_database()
    server = MlflowServer(store, host=host, backend_store=backend, auth=True)
    uri = server.start()

    def stop() -> None:
        server.stop()

    def start() -> str:
        return MlflowServer(store, host=host, port=server.port, backend_store=backend, auth=True).start()

    yield SimpleNamespace(uri=uri, host=host, stop=stop, start=start)
    server.stop()
