"""A local ``mlflow server`` over ``<store_dir>/mlflow.db``, bound to 127.0.0.1 by default.

Used by ``bnsweep ui``, by sweeps (one server shared by every worker) and by the tests. It runs in
its own process group so that ``stop`` ends the server and all its web workers. For shared use
(cluster sweeps) the backend store can be PostgreSQL, the host another interface, and ``auth``
turns on MLflow's basic-auth app with the credentials of MLFLOW_TRACKING_USERNAME/PASSWORD.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bnsweep.defaults import STORE_DIR
from bnsweep.errors import TrackingError

_REACHABLE: set[str] = set()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def preferred_port(port: int = 5000, host: str = "127.0.0.1") -> int:
    """``port`` if nothing listens there, else any free port."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return port
        except OSError:
            return free_port(host)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when an MLflow server does not answer (checked once a process)."""
    if not uri.startswith(("http://", "https://")) or uri in _REACHABLE:
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            if r.status == 200:
                _REACHABLE.add(uri)
                return
            reason = f"HTTP {r.status}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise TrackingError(
        f"MLflow tracking server {uri} is not reachable ({reason}); start it (bnsweep ui) or "
        "unset MLFLOW_TRACKING_URI / tracking.uri to log to mlruns/mlflow.db"
    )


def connect(tracking: Any) -> str:
    """The MLflow server of a sweep or report: MLFLOW_TRACKING_URI / ``tracking.uri``, else the local
    server over ``tracking.store_dir`` (started if none runs there)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri
    if not uri:
        host = tracking.get("host") or "127.0.0.1"
        uri = MlflowServer(tracking.store_dir, host=host, port=tracking.port or preferred_port(host=host),
                           backend_store=tracking.get("backend_store"), auth=bool(tracking.get("auth"))).ensure()
    check_reachable(uri)
    return uri


def healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class MlflowServer:
    """Start, find and stop a tracking server whose PID and URL live in ``<store_dir>/server.*``."""

    def __init__(self, store_dir: str | Path = STORE_DIR, host: str = "127.0.0.1",
                 port: int | None = None, workers: int = 2, backend_store: str | None = None,
                 auth: bool = False) -> None:
        self.store = Path(store_dir).resolve()
        self.host, self.port, self.workers = host, port, workers
        self.backend_store, self.auth = backend_store or f"sqlite:///{self.store / 'mlflow.db'}", auth
        self.pid_file, self.url_file = self.store / "server.pid", self.store / "server.url"
        self.log_file = self.store / "server.log"

    @property
    def shared(self) -> bool:
        return not self.backend_store.startswith("sqlite:") or self.host not in ("127.0.0.1", "localhost", "::1")

    @property
    def uri(self) -> str:
        host = socket.getfqdn() if self.host in ("0.0.0.0", "::") else self.host  # what other nodes dial
        return f"http://{host}:{self.port}"

    def running_uri(self) -> str | None:
        """The URL of a healthy server started earlier over this store, if any."""
        if self.url_file.exists():
            uri = self.url_file.read_text().strip()
            if healthy(uri):
                return uri
        return None

    def start(self, timeout: float = 180.0) -> str:
        self.store.mkdir(parents=True, exist_ok=True)
        (self.store / "artifacts").mkdir(exist_ok=True)
        self.port = self.port or free_port(self.host)
        # Shared use (another store, or reachable from other machines): clients send artifacts through
        # the server, so nodes need no filesystem in common with it. Locally they write the files directly.
        artifacts = (["--artifacts-destination", str(self.store / "artifacts")] if self.shared
                     else ["--default-artifact-root", str(self.store / "artifacts")])
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store, *artifacts,
               "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        # MLflow's job runner (GenAI scorers, trace roll-ups) polls in 8 processes: ~1/4 of a core at
        # idle, taken from training. Tracking does not use it.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
            env |= self.auth_env()
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TrackingError(f"mlflow server exited with code {proc.returncode}; "
                                    f"see {self.log_file}")
            if healthy(self.uri):
                self.url_file.write_text(self.uri)
                return self.uri
            time.sleep(0.5)
        self.stop()
        raise TrackingError(f"mlflow server did not answer within {timeout:.0f} s; see {self.log_file}")

    def auth_env(self) -> dict[str, str]:
        """The basic-auth app's settings: its admin is the user of MLFLOW_TRACKING_USERNAME/PASSWORD.

        The password goes to the server by environment only: never on a command line, in a file or a log.
        """
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if not user or not password:
            raise TrackingError("tracking.auth=true needs the environment variables MLFLOW_TRACKING_USERNAME and "
                                "MLFLOW_TRACKING_PASSWORD (the credentials of the server's admin and its clients)")
        ini = self.store / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.store / 'auth.db'}\n"
                       f"admin_username = {user}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        # CSRF key of the web workers: the user's, else a fresh one (one server, shared by its workers)
        key = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32)
        return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": key}

    def ensure(self) -> str:
        """Reuse a running server over this store, else start one."""
        return self.running_uri() or self.start()

    def stop(self) -> bool:
        if not self.pid_file.exists():
            return False
        pid = int(self.pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                os.killpg(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pid_file.unlink(missing_ok=True)
        self.url_file.unlink(missing_ok=True)
        return True


def main(argv: list[str] | None = None, action: str | None = None) -> None:
    """``bnsweep ui`` (action start) and ``bnsweep down`` (stop); ``python -m bnsweep.server ACTION`` names it."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"bnsweep {'down' if action == 'stop' else 'ui'}" if action else None,
                                 description="The local MLflow server over mlruns/ (the dashboard).")
    if action is None:
        ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--store-dir", default=STORE_DIR, help=f"sqlite store and artifacts (default: {STORE_DIR})")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    ap.add_argument("--port", type=int, default=None, help="default: 5000, or a free port if taken")
    ap.add_argument("--backend-store", default=None, help="e.g. postgresql://user@db/mlflow (default: sqlite)")
    ap.add_argument("--auth", action="store_true", help="basic auth; credentials from MLFLOW_TRACKING_USERNAME"
                    "/PASSWORD")
    args = ap.parse_args(argv)
    action = action or args.action
    server = MlflowServer(args.store_dir, host=args.host, port=args.port, backend_store=args.backend_store,
                          auth=args.auth)
    if action == "stop":
        print("MLflow server stopped" if server.stop() else "no MLflow server was running over "
              f"{server.store}")
        return
    uri = server.running_uri()
    if action == "status":
        print(f"MLflow server running at {uri}" if uri else "no MLflow server running")
        return
    if uri is None:
        server.port = args.port or preferred_port(5000, args.host)
        print(f"starting the MLflow server over {server.store} (takes ~20 s) ...", flush=True)
        uri = server.start()
    print(f"MLflow dashboard: {uri}   (stop it with: bnsweep down)")
    from bnsweep.tracking.dashboard import sweep_links

    links = sweep_links(uri)
    if links:
        print("sweeps (runs tables):", *links, sep="\n")


if __name__ == "__main__":
    main()
