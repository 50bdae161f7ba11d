"""MLflow tracking with few requests per run: create_run, one log_batch per ``tracking.flush_s``, set_terminated.

The fluent API costs ~40 ms a call (0.8-1.4 s for a 10-epoch run); batching costs ~0.12 s, and the
server's load grows with requests, not points (``bnsweep bench --only tracking``).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from bnsweep.defaults import ANSWERED_S, FLUSH_S, REQUEST_RETRIES, REQUEST_TIMEOUT_S, STORE_DIR
from bnsweep.errors import redact
from bnsweep.tracking.names import RUN_NAME_TAG
from bnsweep.tracking.outbox import Batch, Outbox

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no phoning home from research machines
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # else each set_terminated reads the run back
log = logging.getLogger("bnsweep.tracking")
_EXPERIMENTS: dict[tuple[str, str], str] = {}  # (tracking uri, name) -> id, per process
PROJECT_ROOT = Path(__file__).resolve().parents[3]  # a checkout: git_commit() names its commit
MAX_PARAMS, MAX_TAGS, MAX_METRICS = 100, 100, 1000  # MLflow's limits per log_batch
PARAM_LEN = 6000
# MLflow 3's UI opens an experiment by this tag: unset, it shows the GenAI overview (traces, tokens) of an
# empty experiment; "custom_model_development" opens on the runs table, where our metrics are.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
_ANSWERED: dict[str, float] = {}  # tracking uri -> when a background request last succeeded


def resolve_uri(uri: str | None = None, store_dir: str | Path = STORE_DIR) -> str:
    """MLFLOW_TRACKING_URI, else ``tracking.uri``, else a sqlite store in ``store_dir``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if uri:
        return str(uri)
    store = Path(store_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def for_workers(uri: str) -> tuple[str, dict[str, str]]:
    """A tracking URI for a worker's command line, its ``user:password@`` moved to MLflow's credential variables."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri, {}
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), {
        "MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(parts.username or ""),
        "MLFLOW_TRACKING_PASSWORD": urllib.parse.unquote(parts.password)}


def artifact_root(uri: str, store_dir: str | Path = STORE_DIR) -> str | None:
    """Artifacts of a local sqlite store live beside it; a server decides for itself."""
    return (Path(store_dir).resolve() / "artifacts").as_uri() if uri.startswith("sqlite:") else None


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'model.bn.placement': 'after_act', ...} with string values (URL passwords as ***)."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = redact(value)[:PARAM_LEN]
    return out


@functools.cache
def git_commit() -> str:
    """The commit of the checkout this code runs from; "unknown" for an installed package."""
    if not (PROJECT_ROOT / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """One MLflow run in at most three requests when it is short: create_run (with its tags), one log_batch
    per ``flush_s`` seconds (params, tags and every point since the last one), set_terminated.

    ``log`` buffers: the points go to the run's outbox file at once (``outbox.py``: a killed worker or an
    away server loses nothing that was logged) and to the server with the next flush, so the dashboard's
    live curves lag by up to ``flush_s``. Artifacts are written straight to the run's artifact store. With
    ``background=True`` every request goes through one thread, in order, so training never waits on the
    server; ``close`` waits for them and reports a failure as a warning. Nothing is ever read back.
    """

    def __init__(self, uri: str, experiment: str, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
                 store_dir: str | Path = STORE_DIR, background: bool = False, flush_s: float = FLUSH_S,
                 offline: bool = False) -> None:
        self.client = MlflowClient(uri)
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow") if background else None
        self._staged: dict[str, dict[str, Any]] = {"params": {}, "tags": {}, "metrics": {}}
        self._pending: list[Future] = []
        self._broken: Exception | None = None  # background: the first failed request; the rest are skipped
        self.flush_s, self._flushed_at, self._buffer, self._lines = float(flush_s), time.monotonic(), Batch(), 0
        self.offline = offline and background
        if self.offline:  # MLflow away at the start: the outbox alone keeps the run, for ``outbox.replay``
            self._broken = RuntimeError("MLflow was away when the run started")
            self.experiment_id = _EXPERIMENTS.get((uri, experiment))
        else:
            try:
                self.experiment_id = get_or_create_experiment(self.client, experiment, artifact_root(uri, store_dir))
            except Exception as e:
                if not background:
                    raise
                self._broken, self.experiment_id = e, None
        self.outbox: Outbox | None = Outbox(store_dir, {
            "uri": uri, "experiment": experiment, "experiment_id": self.experiment_id, "run_name": run_name,
            "tags": tags, "opened_ms": int(time.time() * 1000)})
        self._run = self._submit(self._create, run_name, tags)

    @classmethod
    def for_run(cls, client: MlflowClient, run_id: str) -> RunTracker:
        """Log to an existing run (e.g. a sweep cell's parent run), synchronously, each ``log`` at once."""
        tracker = cls.__new__(cls)
        tracker.client, tracker._pool, tracker._pending, tracker.outbox = client, None, [], None
        tracker._staged = {"params": {}, "tags": {}, "metrics": {}}
        tracker.flush_s, tracker._flushed_at, tracker._buffer, tracker._lines = 0.0, time.monotonic(), Batch(), 0
        tracker._run = _done(RunInfo(run_id, None))  # its artifact location is asked for only if needed
        return tracker

    @property
    def run_id(self) -> str | None:
        """The run's id; None if MLflow was away when it was to be created (``complete_trial_runs`` makes it)."""
        try:
            return self._run.result().run_id
        except Exception:
            if self._pool is None:
                raise
            return None

    def _create(self, run_name: str | None, tags: dict[str, str]) -> RunInfo:
        info = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info
        if self.outbox:
            self.outbox.run_id(info.run_id)
        return RunInfo(info.run_id, info.artifact_uri)

    def _submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        if self._pool is None:
            return _done(fn(*args, **kwargs))
        future = self._pool.submit(self._unless_broken, fn, *args, **kwargs)
        self._pending.append(future)
        return future

    def _unless_broken(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Background requests after a failed one are skipped: the server is away or slow, and each retry
        would hold the trial's flush for the whole retry budget. The run's points are in its outbox file and
        its result in the Optuna storage; the driver sends both later (``outbox.replay``, ``complete_trial_runs``)."""
        if self._broken is not None:
            raise RuntimeError(f"skipped: an earlier MLflow request failed ({self._broken})")
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            self._broken = e
            raise
        _ANSWERED[self.client.tracking_uri] = time.monotonic()
        return out

    def stage(self, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              metrics: Mapping[str, float] | None = None) -> None:
        """Keep these for the next ``log``."""
        for kind, items in (("params", params), ("tags", tags), ("metrics", metrics)):
            self._staged[kind].update(items or {})

    def log(self, metrics: Mapping[str, float] | None = None, step: int = 0,
            params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> None:
        """Record these (staged metrics at step 0) now; they reach the server with the next flush."""
        self.stage(params, tags)
        now = int(time.time() * 1000)
        staged, self._staged = self._staged, {"params": {}, "tags": {}, "metrics": {}}
        m = [Metric(k, float(v), now, 0) for k, v in staged["metrics"].items()]
        m += [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
        p = {k: str(v)[:PARAM_LEN] for k, v in staged["params"].items()}
        t = {k: str(v) for k, v in staged["tags"].items()}
        self._buffer.add({"m": [[x.key, x.value, x.timestamp, x.step] for x in m], "p": p, "t": t})
        self._lines = self.outbox.add(m, p, t) if self.outbox else 0
        if time.monotonic() - self._flushed_at >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Send what was logged since the last flush, in one request (more only past MLflow's batch limits)."""
        self._flushed_at = time.monotonic()
        if self._buffer:
            batch, self._buffer = self._buffer, Batch()
            self._submit(self._send, batch, self._lines)

    def _send(self, batch: Batch, lines: int) -> None:
        self._log_batch(*batch.entities())
        if self.outbox:
            self.outbox.sent(lines)

    def _log_batch(self, m: list, p: list, t: list) -> None:
        # Usually one request; split only where MLflow's per-request limits demand it.
        while m or p or t:
            self.client.log_batch(self.run_id, metrics=m[:MAX_METRICS], params=p[:MAX_PARAMS], tags=t[:MAX_TAGS])
            m, p, t = m[MAX_METRICS:], p[MAX_PARAMS:], t[MAX_TAGS:]

    def log_files(self, files: Mapping[str, str | bytes]) -> None:
        """Write small artifacts (text or bytes) in one go, to the run's artifact store."""
        self._submit(self._log_files, dict(files))

    def _log_files(self, files: dict[str, str | bytes]) -> None:
        info = self._run.result()
        location = info.artifact_uri or self.client.get_run(info.run_id).info.artifact_uri
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
            # tracking_uri: an mlflow-artifacts:/ location (a shared server's proxy) resolves to our server
            get_artifact_repository(location, tracking_uri=self.client.tracking_uri).log_artifacts(tmp)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (in the background if so built: call ``close`` before the process exits)."""
        if any(self._staged.values()):
            self.log()
        self.flush()
        if self.outbox:
            self.outbox.end(status)
        self._submit(self._terminate, status)

    def _terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
        if self.outbox:
            self.outbox.close(done=True)  # the server holds it all

    def close(self) -> None:
        """Wait for background requests; a failed one becomes a warning, never a lost trial."""
        failed = [e for future in self._pending if (e := future.exception()) is not None]
        if failed and self.offline:
            log.info("MLflow away: the run waits in %s; the next `bnsweep sweep` sends it", self.outbox.path)
        elif failed:
            kept = f" and its points in {self.outbox.path}" if self.outbox else ""
            log.warning("MLflow logging failed for run %s (%d request(s)): %s; the trial's result is safe in "
                        "the Optuna storage%s, and the next `bnsweep sweep` completes its run",
                        self._run_id_or_none(), len(failed), failed[0], kept)
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.outbox:
            self.outbox.close(done=False)  # still owed to the server: kept for ``outbox.replay``

    @property
    def answered(self) -> bool:
        """Every request so far answered (background: after ``close``)."""
        return self._broken is None

    def _run_id_or_none(self) -> str | None:
        try:
            return self.run_id
        except Exception:
            return None


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    artifact_uri: str | None


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    key = (client.tracking_uri, name)
    if key not in _EXPERIMENTS:
        _EXPERIMENTS[key] = _get_or_create_experiment(client, name, artifact_location)
    return _EXPERIMENTS[key]


def _get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if not EXPERIMENT_KIND.items() <= exp.tags.items():  # made before the tag existed
            for k, v in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
    except Exception:  # another worker created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def mark_killed(client: MlflowClient, experiment_id: str, study_name: str, trials: list,
                any_status: bool = False) -> None:
    """End the MLflow runs of trials whose worker died (KILLED), so none stays RUNNING forever.

    ``any_status``: also a FINISHED one (its trial's end never reached the storage, e.g. a torn journal
    tail, so the trial is retried and the retry's run is the slot's one FINISHED run).
    """
    for t in trials:
        status = "" if any_status else " and attributes.status = 'RUNNING'"
        for run in client.search_runs(
                [experiment_id], f"tags.`optuna.trial_id` = '{t._trial_id}' and "
                f"tags.`optuna.study` = '{study_name}'{status}"):
            if run.info.status != "KILLED":
                client.set_terminated(run.info.run_id, "KILLED")


def answers(uri: str, timeout: float = 5.0) -> bool:
    """Whether the MLflow server at ``uri`` answers now (its /health; a local store always does).

    A run's request answered within the last ``ANSWERED_S`` seconds counts: no probe per trial. Should the
    server go away meanwhile, that run's points wait in its outbox.
    """
    if not uri.startswith(("http://", "https://")) or time.monotonic() - _ANSWERED.get(uri, -ANSWERED_S) < ANSWERED_S:
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:  # URLError, refused, timed out
        return False


def quick_requests(retries: int = REQUEST_RETRIES, timeout_s: int = REQUEST_TIMEOUT_S) -> None:
    """Few, short MLflow request retries (unless set): an away server costs seconds, not minutes.

    Set in the environment, so the workers a driver starts inherit its ``tracking.request_*``."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))


def complete_trial_runs(client: MlflowClient, experiment_id: str, study_name: str,
                        trials: list[tuple[Mapping[str, str], Mapping[str, Any], Mapping[str, float], str]]) -> int:
    """Make each finished trial's MLflow run whole, idempotently: one run per trial, ended.

    ``trials``: (tags, params, final metrics, status) per finished trial, its tags naming it by
    ``optuna.trial_id`` (its run's name by ``mlflow.runName``: ``trial_run_name``). A trial whose run was
    never created (MLflow away) gets one rebuilt from the storage (tag ``bnsweep.rebuilt``: final metrics
    only, no per-epoch history or artifacts); one left RUNNING (MLflow went away before the end) gets its
    final metrics and is ended; duplicates (a create_run retried after a lost answer) are deleted. Returns
    the runs changed.
    """
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment_id], f"tags.`optuna.study` = '{study_name}' and "
                                  "tags.`bnsweep.role` = 'trial'", max_results=50000):
        runs.setdefault(run.data.tags.get("optuna.trial_id", ""), []).append(run)
    changed = 0
    for tags, params, metrics, status in trials:
        mine = sorted(runs.get(tags["optuna.trial_id"], []), key=lambda r: (
            r.info.status != "FINISHED", -len(r.data.metrics), r.info.start_time or 0))
        for extra in mine[1:]:
            client.delete_run(extra.info.run_id)
            changed += 1
        if mine and mine[0].info.status != "RUNNING":
            continue
        if mine:
            run_id = mine[0].info.run_id
        else:
            name = tags.get(RUN_NAME_TAG) or f"trial {tags.get('optuna.trial', '')}"  # a rebuilt run: the same name
            run_id = client.create_run(experiment_id, run_name=name, tags={
                **{k: v for k, v in tags.items() if k != RUN_NAME_TAG}, "bnsweep.rebuilt": "true"}).info.run_id
        tracker = RunTracker.for_run(client, run_id)
        tracker.log(metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                    params=params if not mine else None)
        client.set_terminated(run_id, status)
        changed += 1
    return changed


def summary_run(client: MlflowClient, experiment_id: str, sweep: str) -> str:
    """The sweep-level MLflow run (table, report): found by its tag, created the first time."""
    runs = client.search_runs([experiment_id], "tags.`bnsweep.role` = 'summary'")
    return runs[0].info.run_id if runs else client.create_run(
        experiment_id, run_name=f"{sweep} summary",
        tags={"bnsweep.sweep": sweep, "bnsweep.role": "summary"}).info.run_id

