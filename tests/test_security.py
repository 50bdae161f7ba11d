"""The holes a shared server opens: crafted model files, network binding, Host headers, secrets, file modes,
basic auth. Real processes throughout: the CLI, real `mlflow server`s, /proc of the server's processes."""

from __future__ import annotations

import os
import socket
import stat
import urllib.parse
import uuid
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, bnsweep_cli
from mlflow.tracking import MlflowClient

from bnsweep.errors import ConfigError, redact
from bnsweep.sweep.launch_slurm import reattach_hint
from bnsweep.tracking.runs import flatten
from bnsweep.tracking.server import MlflowServer, api_status, check_reachable
from bnsweep.training import checkpoint
from bnsweep.training.models import MLP

# ------------------------------------------------------------------ crafted model files


def crafted(path: Path, victim: Path, where: str) -> Path:
    """A model.pt whose config makes Hydra call pathlib.Path.write_text(victim, ...) (at the top or nested)."""
    payload = {"_target_": "pathlib.Path.write_text", "self": {"_target_": "pathlib.Path", "_args_": [str(victim)]},
               "data": "owned"}
    model = {"_target_": "bnsweep.training.models.MLP", "hidden": [4]}
    if where == "top":
        model = {**payload, "hidden": [4]}
    else:
        model["act_args"] = {"relu": payload}
    torch.save({"format": checkpoint.FORMAT, "model": model, "in_shape": [1, 28, 28], "num_classes": 10,
                "config": {}, "state_dict": {}}, path)
    return path


@pytest.mark.parametrize("where", ["top", "nested"])
def test_crafted_model_file_runs_nothing(tmp_path: Path, where: str) -> None:
    victim = tmp_path / "victim.txt"
    path = crafted(tmp_path / "model.pt", victim, where)
    with pytest.raises(checkpoint.CheckpointError, match="not allowed|only plain values"):
        checkpoint.load(path)
    assert not victim.exists()
    result = bnsweep_cli("export", f"checkpoint={path}", f"tracking.store_dir={tmp_path / 'mlruns'}", cwd=tmp_path)
    assert_one_line_error(result, str(path))
    assert not victim.exists()


def test_our_own_model_files_still_load(tmp_path: Path) -> None:
    cfg = {"_target_": "bnsweep.models.MLP", "_convert_": "all", "hidden": [8], "bn": {"placement": "before_act"}}
    model = MLP((1, 28, 28), 10, hidden=[8], bn={"placement": "before_act"})
    loaded, meta = checkpoint.load(checkpoint.to_bytes(model, cfg, (1, 28, 28), 10))  # legacy target name
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x)) and meta["num_classes"] == 10


# ------------------------------------------------------------------ network binding and Host headers


def test_network_bind_needs_an_explicit_opt_in(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tracking.allow_network=true"):
        MlflowServer(tmp_path / "s", host="0.0.0.0").start()
    assert not (tmp_path / "s" / "server.pid").exists()  # nothing was started
    sweep = tmp_path / "one.yaml"
    sweep.write_text("name: t_net\nbase: [data.limit_train=500]\nn_trials: 1\nrepeats: 0\nepochs: 1\n")
    result = bnsweep_cli("sweep", f"sweep={sweep}", "tracking.host=0.0.0.0", f"tracking.store_dir={tmp_path / 'm'}",
                         cwd=tmp_path)
    assert_one_line_error(result, "tracking.host=0.0.0.0", "tracking.auth=true", "tracking.allow_network=true")


def test_workers_host_header_is_allowed(mlflow_server: str) -> None:
    """/health says 200 to any Host; an API call with the node's name was 403 before MLflow was told it."""
    port = urllib.parse.urlsplit(mlflow_server).port
    assert api_status(mlflow_server, host=f"{socket.gethostname()}:{port}")[0] == 200
    assert api_status(mlflow_server, host=f"{socket.getfqdn()}:{port}")[0] == 200
    assert api_status(mlflow_server, host="attacker.example:80")[0] == 403  # the check itself is still on


# ------------------------------------------------------------------ secrets, modes, reuse, basic auth


def group_cmdlines(pid: int) -> list[str]:
    """The command lines of every process in the server's process group (uvicorn workers included)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) == pid:
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return out


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory):
    """A real basic-auth `mlflow server` whose backend URL carries a marker standing in for a password."""
    marker = f"pw-{uuid.uuid4().hex[:12]}"
    store = tmp_path_factory.mktemp("auth") / "store"
    store.mkdir(mode=0o755)
    store.chmod(0o755)  # as a loose umask leaves it: the server must tighten it
    env = {"MLFLOW_TRACKING_USERNAME": "sweeper", "MLFLOW_TRACKING_PASSWORD": f"secret-{marker}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    backend = f"sqlite:///{store / marker}.db"
    server = MlflowServer(store, backend_store=backend, auth=True)
    try:
        yield server, server.start(), marker
    finally:
        server.stop()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_no_password_on_any_server_command_line(auth_server) -> None:
    server, _, marker = auth_server
    lines = group_cmdlines(int(server.pid_file.read_text()))
    assert lines and any("mlflow" in line for line in lines)
    assert not [line for line in lines if marker in line]


def test_store_and_its_files_are_private(auth_server) -> None:
    server, _, marker = auth_server
    assert stat.S_IMODE(server.store.stat().st_mode) == 0o700
    for name in (f"{marker}.db", "server.log", "basic_auth.ini", "server.url", "server.pid"):
        assert stat.S_IMODE((server.store / name).stat().st_mode) == 0o600, name


def test_basic_auth_with_credentials_from_the_environment(auth_server, monkeypatch) -> None:
    server, uri, _ = auth_server
    check_reachable(uri)  # a real API call with the env's credentials
    assert MlflowClient(uri).create_experiment(f"auth-{uuid.uuid4().hex[:6]}")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    assert api_status(uri)[0] == 401


def test_running_server_is_reused_only_as_asked(auth_server) -> None:
    server, uri, _ = auth_server
    assert MlflowServer(server.store, backend_store=server.backend_store, auth=True).ensure() == uri
    with pytest.raises(ConfigError, match="auth=True \\(asked: False\\)"):
        MlflowServer(server.store, backend_store=server.backend_store, auth=False).ensure()


def test_passwords_are_redacted_in_messages_params_and_hints() -> None:
    url = "postgresql://sweeper:hunter2@db:5432/optuna"
    assert redact(f"cannot open {url}") == "cannot open postgresql://sweeper:***@db:5432/optuna"
    assert "hunter2" not in flatten({"tracking": {"uri": "http://u:hunter2@mlflow:5000"}})["tracking.uri"]
    hint = reattach_hint(["sweep=default", f"storage={url}", "launcher=slurm", "launcher.wait=false"])
    assert "hunter2" not in hint and "storage=postgresql://sweeper:***@db:5432/optuna" in hint


def test_a_password_never_reaches_the_error_line(tmp_path: Path) -> None:
    result = bnsweep_cli("sweep", "sweep=tiny", "tracking.uri=http://u:hunter2@127.0.0.1:1",
                         f"tracking.store_dir={tmp_path}", cwd=tmp_path)
    assert_one_line_error(result, "http://u:***@127.0.0.1:1", "not reachable")
    assert "hunter2" not in result.stdout + result.stderr
