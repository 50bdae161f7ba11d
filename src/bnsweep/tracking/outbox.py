"""A run's MLflow history on local disk until the server has it: ``<store>/outbox/<id>.jsonl``.

``RunTracker`` sends a run's metrics in a few large requests (one per ``tracking.flush_s`` and one at the
end), so until a request is answered its points exist only here. Each ``log`` appends one line; each
answered request appends how many lines the server now holds; the run's end appends its status. The file is
deleted once the server has ended the run. A worker killed mid-run, or a server away, leaves the file:
``replay`` (the sweep driver, before it completes runs from the storage) sends what is left, creating the
run if the server never saw it, and ends it if its trial had ended. The writer holds an exclusive
``flock`` while the run is live, so ``replay`` never touches a run that is still training.

Lines: ``{"open": {uri, experiment, experiment_id, run_name, tags, opened_ms}}``, ``{"run_id": id}``,
``{"m": [[key, value, timestamp_ms, step], ...], "p": {key: value}, "t": {key: value}}``,
``{"sent": lines}``, ``{"end": status}``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger("bnsweep.tracking")
FOLDER = "outbox"
GONE = ("RESOURCE_DOES_NOT_EXIST", "INVALID_STATE")  # the run was deleted (a duplicate): nothing to send it to


@dataclass
class Batch:
    """Metrics, params and tags bound for one run, merged across ``log`` calls."""

    metrics: list[Metric] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def add(self, record: Mapping[str, Any]) -> None:
        self.metrics += [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record.get("m", ())]
        self.params.update(record.get("p") or {})
        self.tags.update(record.get("t") or {})

    def __bool__(self) -> bool:
        return bool(self.metrics or self.params or self.tags)

    def entities(self) -> tuple[list[Metric], list[Param], list[RunTag]]:
        return (self.metrics, [Param(k, v) for k, v in self.params.items()],
                [RunTag(k, v) for k, v in self.tags.items()])


def folder(store_dir: str | Path) -> Path:
    return Path(store_dir).resolve() / FOLDER


class Outbox:
    """One live run's file, locked by this process; every write is appended and flushed at once."""

    def __init__(self, store_dir: str | Path, opening: Mapping[str, Any]) -> None:
        path = folder(store_dir)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path / f"{uuid.uuid4().hex}.jsonl"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()  # log() in the training thread, answers in the sending thread
        self.lines = 0  # data lines written
        self._write({"open": dict(opening)})

    def _write(self, obj: Mapping[str, Any]) -> None:
        with self._lock:
            if self._file.closed:
                return
            self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self._file.flush()  # in the page cache: survives this process being killed

    def add(self, metrics: list[Metric], params: Mapping[str, str], tags: Mapping[str, str]) -> int:
        """Append one ``log``'s content; returns the number of data lines written so far."""
        self._write({"m": [[m.key, m.value, m.timestamp, m.step] for m in metrics], "p": dict(params),
                     "t": dict(tags)})
        self.lines += 1
        return self.lines

    def run_id(self, run_id: str) -> None:
        self._write({"run_id": run_id})

    def sent(self, lines: int) -> None:
        self._write({"sent": lines})

    def end(self, status: str) -> None:
        self._write({"end": status})

    def close(self, done: bool) -> None:
        """Release the file; ``done``: the server holds everything and ended the run, so delete it."""
        with self._lock:
            if self._file.closed:
                return
            if done:
                self.path.unlink(missing_ok=True)
            self._file.close()  # releases the flock


@dataclass
class Left:
    """What a left-behind outbox file still owes the server."""

    path: Path
    opening: dict[str, Any]
    run_id: str | None
    batch: Batch
    end: str | None


def read(path: Path) -> Left | None:
    """The file's content; None if it is torn beyond its first line (a partial last line is skipped)."""
    opening, run_id, end, sent, records = None, None, None, 0, []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # the line being written when the process died
        if "open" in obj:
            opening = obj["open"]
        elif "run_id" in obj:
            run_id = obj["run_id"]
        elif "sent" in obj:
            sent = max(sent, int(obj["sent"]))
        elif "end" in obj:
            end = obj["end"]
        else:
            records.append(obj)
    if opening is None:
        return None
    batch = Batch()
    for record in records[sent:]:
        batch.add(record)
    return Left(path, opening, run_id, batch, end)


def left_behind(store_dir: str | Path) -> Iterator[Left]:
    """Each outbox file no live process holds, locked while the caller handles it."""
    for path in sorted(folder(store_dir).glob("*.jsonl")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # finished meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run: its own process sends it
            left = read(path)
            if left is None:
                path.unlink(missing_ok=True)
                continue
            yield left
        finally:
            os.close(fd)


def created(client: MlflowClient, experiment_id: str, opening: Mapping[str, Any]) -> str | None:
    """The run a killed writer created after all, though its answer (the run id) never reached the file.

    Its create request may have reached the server just before the kill: the run is the one with the
    opening's tags and name, started no earlier than the file was opened. Creating another would duplicate it.
    """
    tags = {k: v for k, v in (opening.get("tags") or {}).items() if "'" not in str(v) and "`" not in k}
    if not tags or "opened_ms" not in opening:
        return None
    where = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    where.append(f"attributes.start_time >= {int(opening['opened_ms']) - 1000}")
    runs = [r for r in client.search_runs([experiment_id], " and ".join(where), max_results=10)
            if r.info.run_name == opening.get("run_name", r.info.run_name)]
    return runs[0].info.run_id if runs else None


def replay(client: MlflowClient, store_dir: str | Path, uri: str | None = None) -> int:
    """Send what killed or cut-off runs left in the outbox; returns the runs replayed.

    A run the server never saw is created (with its tags, run name and parent); a run whose trial ended is
    ended with its status; one that was still training keeps its status (``mark_killed`` ends it). Any
    request that fails leaves the file for the next replay. Only runs logged to ``uri`` (default: the
    client's server) are sent: another sweep over the same store may log to another server.
    """
    done = 0
    for left in left_behind(store_dir):
        if left.opening.get("uri", client.tracking_uri) != (uri or client.tracking_uri):
            continue  # another server's run (two sweeps over one store): its own driver replays it
        try:
            run_id = left.run_id
            if run_id is None:
                o = left.opening
                experiment_id = o.get("experiment_id") or client.get_experiment_by_name(o["experiment"]).experiment_id
                run_id = created(client, experiment_id, o) or client.create_run(
                    experiment_id, run_name=o.get("run_name"), tags=o.get("tags") or {}).info.run_id
            if left.batch:
                client.log_batch(run_id, *left.batch.entities())
            if left.end:
                client.set_terminated(run_id, left.end)
        except Exception as e:
            if isinstance(e, MlflowException) and e.error_code in GONE:
                log.warning("MLflow outbox %s dropped: its run is gone (%s)", left.path.name, e)
                left.path.unlink(missing_ok=True)
                continue
            # the server is still away: the files stay
            log.warning("MLflow outbox %s not replayed (%s); the next `bnsweep sweep` tries again", left.path.name, e)
            break
        left.path.unlink(missing_ok=True)
        done += 1
    if done:
        log.info("replayed %d run(s)' history from the MLflow outbox", done)
    return done
