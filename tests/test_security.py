"""The holes a shared server opens: crafted model files, network binding, Host headers, secrets, file modes,
basic auth. Real processes throughout: the CLI, real `mlflow server`s, /proc of the server's processes."""

from __future__ import annotations

import os
import re
import socket
import stat
import urllib.parse
import uuid
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from helpers import assert_one_line_error, bnsweep_cli
from mlflow.tracking import MlflowClient

from bnsweep.errors import ConfigError, check_name, redact
from bnsweep.sweep import files, storage
from bnsweep.sweep.definition import parse
from bnsweep.sweep.launch_slurm import reattach_hint
from bnsweep.tracking import runs
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


def test_worker_command_lines_carry_no_password(monkeypatch) -> None:
    """The storage's and MLflow's passwords reach workers by environment (``ps`` shows argv), and the
    worker puts the storage's back into its URL."""
    from bnsweep.sweep.launch import Launch

    url = "postgresql://sweeper:hunter%402@db:5432/optuna"
    sweep = SimpleNamespace(storage_url=url, uri="http://admin:s3cret@mlflow:5000", heartbeat_s=30,
                            stale_after_s=900.0, storage_wait_s=300.0, spec=SimpleNamespace(name="s"))
    for key in (storage.STORAGE_PASSWORD_ENV, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    args = Launch.worker_args(sweep)
    assert not [a for a in args if "hunter" in a or "s3cret" in a], args
    assert args[args.index("--storage") + 1] == "postgresql://sweeper@db:5432/optuna"
    assert args[args.index("--tracking-uri") + 1] == "http://mlflow:5000"
    assert os.environ[storage.STORAGE_PASSWORD_ENV] == "hunter@2"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("admin", "s3cret")
    assert storage.with_password("postgresql://sweeper@db:5432/optuna") == url  # what the worker opens
    assert runs.for_workers("http://mlflow:5000") == ("http://mlflow:5000", {})


def test_journal_is_private_from_its_creation(tmp_path: Path) -> None:
    fresh = tmp_path / "optuna" / "s.journal"
    storage.open_storage(str(fresh))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    old = tmp_path / "old.journal"
    old.write_text("")
    old.chmod(0o644)  # made before journals were private
    storage.open_storage(str(old))
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def journal_with_trials(path: Path, n: int = 4) -> list[bytes]:
    """A real journal: one study and ``n`` finished trials; returns its lines."""
    study = optuna.create_study(storage=storage.open_storage(str(path)), study_name="s/c")
    for i in range(n):
        study.add_trial(optuna.trial.create_trial(params={"x": float(i)}, distributions={
            "x": optuna.distributions.FloatDistribution(0, 10)}, value=float(i)))
    return path.read_bytes().splitlines()


def test_a_torn_record_inside_the_journal_is_cut_with_a_backup(tmp_path: Path) -> None:
    """A crash mid-append leaves a torn record; the next append (another worker) glues a whole one to it.
    Not only at the tail: anywhere in the file. The torn one is cut, the glued one kept, the file backed up."""
    path = tmp_path / "s.journal"
    lines = journal_with_trials(path)
    whole = len(lines)
    torn = lines[3][: len(lines[3]) // 2]  # the first half of a record, then the next record right after it
    path.write_bytes(b"\n".join([*lines[:3], torn + lines[4], *lines[5:]]) + b"\n")
    study = optuna.load_study(study_name="s/c", storage=storage.open_storage(str(path)))
    assert (tmp_path / "s.journal.torn-1").read_bytes().count(b"\n") == whole - 1  # the file as it was
    assert len(path.read_bytes().splitlines()) == whole - 1  # only the torn record is gone
    assert len(study.trials) >= 3 and all(t.value == t.params["x"] for t in study.trials if t.value is not None)


def test_a_damaged_journal_line_is_refused_naming_the_backup(tmp_path: Path) -> None:
    path = tmp_path / "s.journal"
    lines = journal_with_trials(path)
    damaged = b"\n".join([*lines[:2], b"\x00\x00 not a record", *lines[2:]]) + b"\n"
    path.write_bytes(damaged)
    with pytest.raises(ConfigError, match=r"line 3 of the journal is damaged.*copied to .*s\.journal\.torn-1"):
        storage.open_storage(str(path))
    assert path.read_bytes() == damaged == (tmp_path / "s.journal.torn-1").read_bytes()  # nothing cut


@pytest.mark.parametrize(("content", "message"), [
    ("name: x\ngrid: {a: [1\n", "is not valid YAML at line 3"),
    ("- 1\n- 2\n", "holds list, not a mapping"),
    ("a: &a [1]\n" + "x: " + "*a " * 0 + "'" + "y" * 1_100_000 + "'\n", "bytes; a sweep file is a short"),
])
def test_a_malformed_sweep_file_is_one_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(f"sweep={path} is not allowed: {path}") + ".*" + message):
        files.find(str(path))


@pytest.mark.parametrize("name", ["../x", "/etc/cron.d/x", "a/../../b", ".hidden", "", "x" * 101, "a b", "n\x00"])
def test_hostile_names_are_refused_before_they_become_paths(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sweep\.name=.* is not allowed; use 1-100 letters"):
        storage.default_storage(tmp_path, name)
    with pytest.raises(ConfigError, match=r"sweep\.name"):
        parse({"name": name, "grid": {"model.bn.placement": ["none"]},
               "search": {"optimizer.lr": {"low": 1e-3, "high": 1.0, "log": True}}})
    assert check_name("sweep.name", "claims_seed001.v2-b") == "claims_seed001.v2-b"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("run_id", ["../../../etc/passwd", "0" * 31, "G" * 32, "abc"])
def test_a_malformed_run_id_is_one_error(run_id: str, tmp_path: Path) -> None:
    from bnsweep.config import compose
    from bnsweep.deploy.export import _fetch

    cfg = compose("export", [f"run_id={run_id}", "tracking.uri=http://127.0.0.1:9"])
    with pytest.raises(ConfigError, match=re.escape(f"run_id={run_id!r} is not allowed")):
        _fetch(cfg, tmp_path)
