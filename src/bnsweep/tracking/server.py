"""A local ``mlflow server`` over ``<store_dir>/mlflow.db``, bound to 127.0.0.1 by default.

Used by ``bnsweep ui``, by sweeps (one server shared by every worker) and by the tests. It runs in
its own process group so that ``stop`` ends the server and all its web workers. For shared use
(cluster sweeps) the backend store can be PostgreSQL, the host another interface, and ``auth``
turns on MLflow's basic-auth app with the credentials of MLFLOW_TRACKING_USERNAME/PASSWORD.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnsweep.defaults import STORE_DIR, server_workers
from bnsweep.errors import BnsweepError, ConfigError, TrackingError, check_bool, check_int, redact

log = logging.getLogger("bnsweep.tracking")
_REACHABLE: set[str] = set()
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# A call every worker makes (not /health, which MLflow exempts from its Host-header check).
PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def private_dir(path: str | Path) -> Path:
    """``path`` created (or tightened) to 0700: the sqlite store, auth db and logs are this user's only."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        log.info("%s: made private (0700): it holds the tracking store, the journal and logs", path)
        path.chmod(0o700)
    return path


def private_file(path: Path, text: str) -> None:
    """Write ``text`` to a file only this user can read (0600 from its creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


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


def api_status(uri: str, timeout: float = 5.0, host: str | None = None) -> tuple[int | None, str]:
    """(HTTP status, reason) of one real API call, with this process's credentials and Host header.

    A worker is served only if MLflow's allowed-hosts check accepts the Host it dials and its
    credentials pass: /health answers 200 either way, so it proves neither.
    """
    request = urllib.request.Request(f"{uri.rstrip('/')}{PROBE}")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return e.code, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return None, str(getattr(e, "reason", e))


def check_reachable(uri: str, timeout: float = 20.0) -> None:
    """Fail fast, before any training, when an MLflow server does not serve this process (checked once).

    A refused connection fails at once; the timeout is for a busy shared server (basic auth hashes the
    password on every request), which may take seconds to answer while a cluster logs to it.
    """
    if not uri.startswith(("http://", "https://")) or uri in _REACHABLE:
        return
    status, reason = api_status(uri, timeout)
    if status == 200:
        _REACHABLE.add(uri)
        return
    shown = redact(uri)
    if status == 403:
        raise TrackingError(f"MLflow server {shown} refuses this client's Host header ({reason}): start it with "
                            f"MLFLOW_SERVER_ALLOWED_HOSTS including {urllib.parse.urlsplit(uri).netloc}, or use "
                            "the address it allows")
    if status == 401:
        raise TrackingError(f"MLflow server {shown} needs credentials ({reason}): set MLFLOW_TRACKING_USERNAME "
                            "and MLFLOW_TRACKING_PASSWORD")
    raise TrackingError(
        f"MLflow tracking server {shown} is not reachable ({reason}); start it (bnsweep ui) or "
        "unset MLFLOW_TRACKING_URI / tracking.uri to log to mlruns/mlflow.db"
    )


def write_ahead(db: Path) -> None:
    """SQLite in write-ahead-log mode (kept in the file): a commit is one append, not a rewritten journal,
    and readers never block the writer; ~1.4x the requests/s of the default (``bnsweep bench --only tracking``)."""
    import sqlite3

    fd = os.open(db, os.O_RDWR | os.O_CREAT, 0o600)  # this user's only, as the server would make it
    os.close(fd)
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        con.execute("PRAGMA journal_mode=WAL")


def connect(tracking: Any) -> str:
    """The MLflow server of a sweep or report: MLFLOW_TRACKING_URI / ``tracking.uri``, else the local
    server over ``tracking.store_dir`` (started if none runs there)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri
    private_dir(tracking.store_dir)  # the Optuna journal and worker logs live here too
    if not uri:
        if tracking.get("port") is not None:
            check_int("tracking.port", tracking.port, 1, 65535)
        host = tracking.get("host") or "127.0.0.1"
        if tracking.get("server_workers") is not None:
            check_int("tracking.server_workers", tracking.server_workers, 1, 64)
        uri = MlflowServer(tracking.store_dir, host=host, port=tracking.port or preferred_port(host=host),
                           backend_store=tracking.get("backend_store"), workers=tracking.get("server_workers"),
                           auth=check_bool("tracking.auth", bool_or(tracking.get("auth"))),
                           allow_network=check_bool("tracking.allow_network",
                                                    bool_or(tracking.get("allow_network")))).ensure()
    check_reachable(uri)
    return uri


def bool_or(value: Any) -> Any:
    """``None`` (key unset) as false; anything else as given, for check_bool to judge."""
    return False if value is None else value


def healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class MlflowServer:
    """Start, find and stop a tracking server whose PID and URL live in ``<store_dir>/server.*``."""

    def __init__(self, store_dir: str | Path = STORE_DIR, host: str = "127.0.0.1",
                 port: int | None = None, workers: int | None = None, backend_store: str | None = None,
                 auth: bool = False, allow_network: bool = False) -> None:
        self.store = Path(store_dir).resolve()
        self.host, self.port, self.workers = host, port, server_workers(workers)
        self.backend_store, self.auth = backend_store or f"sqlite:///{self.store / 'mlflow.db'}", auth
        self.allow_network = allow_network
        self.pid_file, self.url_file = self.store / "server.pid", self.store / "server.url"
        self.log_file = self.store / "server.log"
        self.settings_file = self.store / "server.json"  # what the running server was asked for

    @property
    def shared(self) -> bool:
        return not self.backend_store.startswith("sqlite:") or self.host not in LOOPBACK

    def check_exposure(self) -> None:
        """A server bound beyond loopback can be read and written by anyone on the network: warn, and
        without ``tracking.auth`` ask for an explicit ``tracking.allow_network=true``."""
        if self.host in LOOPBACK:
            return
        if not self.auth and not self.allow_network:
            raise ConfigError(f"tracking.host={self.host} makes the MLflow server readable and writable by anyone "
                              "on the network; set tracking.auth=true (with MLFLOW_TRACKING_USERNAME/PASSWORD), "
                              "or tracking.allow_network=true to accept that, or use tracking.host=127.0.0.1")
        log.warning("the MLflow server on %s is reachable from the network%s", self.host,
                    "" if self.auth else " WITHOUT a password (tracking.allow_network=true)")

    def allowed_hosts(self) -> str:
        """MLflow's allowed Host headers: its defaults (loopback, private IPs) plus the names workers dial."""
        from mlflow.server.security_utils import get_default_allowed_hosts

        names = {socket.gethostname(), socket.getfqdn(), urllib.parse.urlsplit(self.uri).hostname or ""}
        if self.host not in ("0.0.0.0", "::"):
            names.add(self.host)
        extra = [p for n in sorted(names - {""}) for p in (n, f"{n}:*")]
        return ",".join(dict.fromkeys([*get_default_allowed_hosts(), *extra]))

    def settings(self) -> dict[str, Any]:
        """What a reused server must match: host, auth, and a digest of the backend store (not the URL)."""
        import hashlib

        return {"host": self.host, "auth": self.auth,
                "backend_store": hashlib.sha256(self.backend_store.encode()).hexdigest()[:16]}

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
        self.check_exposure()
        private_dir(self.store)
        (self.store / "artifacts").mkdir(exist_ok=True, mode=0o700)
        self.port = self.port or free_port(self.host)
        # Shared use (another store, or reachable from other machines): clients send artifacts through
        # the server, so nodes need no filesystem in common with it. Locally they write the files directly.
        artifacts = (["--artifacts-destination", str(self.store / "artifacts")] if self.shared
                     else ["--default-artifact-root", str(self.store / "artifacts")])
        # The backend store URL (a PostgreSQL password) goes by environment, never on the command line (ps).
        cmd = [sys.executable, "-m", "mlflow", "server", *artifacts,
               "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]
        # MLflow's job runner (GenAI scorers, trace roll-ups) polls in 8 processes: ~1/4 of a core at
        # idle, taken from training. Tracking does not use it.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ,
               "MLFLOW_BACKEND_STORE_URI": self.backend_store, "MLFLOW_SERVER_ALLOWED_HOSTS": self.allowed_hosts()}
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
            env |= self.auth_env()
        if self.backend_store.startswith("sqlite:///"):
            write_ahead(Path(self.backend_store.removeprefix("sqlite:///")))
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            # umask 077: mlflow.db, auth.db and artifacts the server creates are this user's only
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, umask=0o077,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        private_file(self.pid_file, str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TrackingError(f"mlflow server exited with code {proc.returncode}; "
                                    f"see {self.log_file}")
            if healthy(self.uri):
                private_file(self.url_file, self.uri)
                private_file(self.settings_file, json.dumps(self.settings()))
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
        private_file(ini, f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.store / 'auth.db'}\n"
                       f"admin_username = {user}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        # CSRF key of the web workers: the user's, else a fresh one (one server, shared by its workers)
        key = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32)
        return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": key}

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """One find-or-start at a time over this store: commands started together (two sweeps, a sweep and
        ``bnsweep ui``) share one server instead of each starting one on the same new SQLite database."""
        fd = os.open(private_dir(self.store) / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
            yield
        finally:
            os.close(fd)

    def ensure(self) -> str:
        """Reuse a running server over this store if it was started as asked now (host, auth, store), else
        start one; a server started otherwise is refused, not silently used with weaker settings."""
        with self.starting():
            uri = self.running_uri()
            if uri is None:
                return self.start()
        try:
            running = json.loads(self.settings_file.read_text())
        except (OSError, ValueError):
            running = {"host": "127.0.0.1", "auth": False}  # started before settings were recorded
        asked = self.settings()
        differ = [k for k in asked if running.get(k, asked[k]) != asked[k]]
        if differ:
            shown = ", ".join(f"{k}={running.get(k)} (asked: {asked[k]})" for k in differ if k != "backend_store")
            raise ConfigError(f"an MLflow server over {self.store} already runs at {uri} with other settings: "
                              f"{shown or 'another backend_store'}; stop it (bnsweep down) or ask for the same")
        return uri

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
        self.settings_file.unlink(missing_ok=True)
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
    ap.add_argument("--allow-network", action="store_true", help="bind beyond loopback without --auth "
                    "(anyone on the network can read and write)")
    args = ap.parse_args(argv)
    action = action or args.action
    server = MlflowServer(args.store_dir, host=args.host, port=args.port, backend_store=args.backend_store,
                          auth=args.auth, allow_network=args.allow_network)
    if action == "stop":
        print("MLflow server stopped" if server.stop() else "no MLflow server was running over "
              f"{server.store}")
        return
    if action == "status":
        uri = server.running_uri()
        print(f"MLflow server running at {uri}" if uri else "no MLflow server running")
        return
    with server.starting():
        uri = server.running_uri()
        if uri is None:
            server.port = args.port or preferred_port(5000, args.host)
            print(f"starting the MLflow server over {server.store} (takes ~20 s) ...", flush=True)
            try:
                uri = server.start()
            except BnsweepError as e:
                sys.exit(f"error: {redact(e)}")
    print(f"MLflow dashboard: {uri}   (stop it with: bnsweep down)")
    from bnsweep.tracking.dashboard import sweep_links

    links = sweep_links(uri)
    if links:
        print("sweeps (runs tables):", *links, sep="\n")


if __name__ == "__main__":
    main()
