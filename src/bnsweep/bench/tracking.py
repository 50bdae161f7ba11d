"""``bnsweep bench --only tracking``: what one MLflow server and one Optuna storage sustain.

The logging pattern is recorded, not assumed: one real trial of the default study's first cell is trained
against the bench's own server, and its run is read back (params, tags, each ``log`` call's metrics by their
timestamps, artifacts). Simulated trials then replay that pattern, their ``log`` calls spread over
``trial_s`` seconds, from 1, 2, 4 ... 64 threads at once, through ``RunTracker`` as a sweep worker uses it
(background requests): today's pattern (``flush_s=0``: one request per ``log``) and the buffered one
(``tracking.flush_s``) side by side. Offered load is threads / ``trial_s``; sustained is the trials that
ended / the time they took. Requests are counted on the server (its access log). Artifacts are left out of
the simulation: a local server's clients write them to the store directly, with no request.

The Optuna side: claimers (threads, each with its own storage object) take WAITING trials with the
sweep's own ``slots.claim`` and complete them (``study.tell``), for the journal file and, when
BNSWEEP_TEST_PG names one, PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import statistics
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bnsweep.defaults import FLUSH_S, worker_count

LEVELS = (1, 2, 4, 8, 16, 32, 64)
KNEE = 0.9  # the knee: the first level whose sustained rate falls below this share of the offered rate
REQUEST = re.compile(r'"(?:GET|POST|PUT|PATCH|DELETE) (/[^ ?"]*)')


@dataclass
class Pattern:
    """What one trial logs, in order: create tags, then each ``log`` call (metrics, step, params, tags)."""

    tags: dict[str, str]
    calls: list[tuple[dict[str, float], int, dict[str, str], dict[str, str]]] = field(default_factory=list)
    staged: dict[str, float] = field(default_factory=dict)  # step-0 metrics sent with the first call
    artifacts: dict[str, int] = field(default_factory=dict)  # name -> bytes
    run_name: str | None = None

    @property
    def points(self) -> int:
        return len(self.staged) + sum(len(m) for m, *_ in self.calls)


def cell_config(store: Path, uri: str, limit_train: int | None = None, flush_s: float = 0.0):
    """The default study's first cell as a worker composes it (1 epoch, its checks and final metrics)."""
    from bnsweep.config import compose
    from bnsweep.sweep.definition import parse

    spec = parse(compose("run_sweep", []).sweep)
    limit = [f"data.limit_train={limit_train}"] if limit_train else []
    return compose("train", [*spec.cells()[0].overrides, *limit, "optimizer.lr=0.1", "threads=1",
                             f"tracking.uri={uri}", f"tracking.store_dir={store}", "tracking.experiment=bench-record",
                             f"tracking.flush_s={flush_s}", "tracking.run_name='lr 0.1 · seed 0'"])


def record_pattern(uri: str, store: Path, limit_train: int | None = None) -> Pattern:
    """Train one real trial of the default study and read back what its run holds."""
    from mlflow.tracking import MlflowClient

    from bnsweep.training.run import quiet_lightning, run_training

    quiet_lightning()
    tags = {"optuna.study": "default/placement=none,activation=sigmoid", "optuna.trial": "0",
            "optuna.trial_id": "1", "bnsweep.sweep": "default", "bnsweep.cell": "placement=none,activation=sigmoid",
            "bnsweep.role": "trial"}
    result = run_training(cell_config(store, uri, limit_train), tags=tags)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    by_time: dict[int, dict[int, dict[str, float]]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            by_time.setdefault(m.timestamp, {}).setdefault(m.step, {})[key] = m.value
    groups = [by_time[ts] for ts in sorted(by_time)]  # one per ``log`` call (its timestamp)
    staged = groups[0].pop(0) if len(groups[0]) > 1 else {}  # parameter counts, staged at step 0
    calls = [(metrics, step, {}, {}) for g in groups for step, metrics in g.items()]
    created = {k: v for k, v in run.data.tags.items() if k in tags}
    final = {k: run.data.tags[k] for k in ("diverged", "outcome") if k in run.data.tags}
    given = {k: v for k, v in run.data.tags.items() if k not in created and k not in final and k != "mlflow.runName"}
    calls[0] = (calls[0][0], calls[0][1], dict(run.data.params), given)
    calls[-1] = (calls[-1][0], calls[-1][1], {}, final)
    artifacts = {a.path: a.file_size or 0 for a in client.list_artifacts(run.info.run_id)}
    return Pattern(created, calls, staged, artifacts, run.info.run_name)


class RequestLog:
    """A server's requests by endpoint, counted in its access log (``<store>/server.log``)."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset = Path(path), 0
        self.take()

    def take(self) -> Counter:
        """Requests since the last call."""
        time.sleep(0.5)  # the log lines of the last answered requests
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            text = f.read().decode(errors="replace")
            self._offset = f.tell()
        return Counter(m.group(1).removeprefix("/api/2.0/mlflow/") for m in REQUEST.finditer(text))


class Server:
    """A real ``mlflow server`` as bnsweep starts it, with its access log read for request counts."""

    def __init__(self, store: Path, workers: int, backend_store: str | None = None) -> None:
        from bnsweep.tracking.server import MlflowServer

        self.server = MlflowServer(store, workers=workers, backend_store=backend_store)
        self.uri = self.server.start()
        self.log = RequestLog(self.server.log_file)
        self._cpu = self.cpu_s()

    def requests(self) -> Counter:
        return self.log.take()

    def cpu_s(self) -> float:
        """CPU seconds the server's processes (its process group) have used so far."""
        import psutil

        pgid, total = int(self.server.pid_file.read_text()), 0.0
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == pgid:
                    t = p.cpu_times()
                    total += t.user + t.system
            except (psutil.Error, OSError):
                continue
        return total

    def cpu_since(self) -> float:
        """Server CPU seconds since the last call: its cost, whatever else shares the machine."""
        now = self.cpu_s()
        used, self._cpu = now - self._cpu, now
        return used

    def stop(self) -> None:
        self.server.stop()


def simulate(uri: str, store: Path, pattern: Pattern, threads: int, trial_s: float, trials: int,
             flush_s: float, experiment: str) -> tuple[int, int, float]:
    """``threads`` simulated trials at a time, ``trials`` in all (at least one per thread), each thread's one
    after another; returns (trials ended with every request answered, trials run, seconds until the last ended)."""
    from bnsweep.tracking.runs import RunTracker

    done, lock = [0], threading.Lock()
    start = time.monotonic()

    def one() -> RunTracker:
        t0 = time.monotonic()
        tracker = RunTracker(uri, experiment, pattern.run_name, tags={
            **pattern.tags, "optuna.trial_id": uuid.uuid4().hex}, store_dir=store, background=True, flush_s=flush_s)
        tracker.stage(metrics=pattern.staged)
        for i, (metrics, step, params, tags) in enumerate(pattern.calls):
            time.sleep(max(0.0, t0 + trial_s * (i + 1) / len(pattern.calls) - time.monotonic()))
            tracker.log(metrics, step=step, params=params, tags=tags)
        tracker.finish("FINISHED")
        return tracker

    def ended(tracker: RunTracker) -> None:
        tracker.close()
        with lock:
            done[0] += tracker.answered  # a trial whose request failed (timed out) is not sustained

    def loop() -> None:
        """As a worker: a trial's requests overlap the next trial, whose end waits for them (``flush(keep=1)``)."""
        previous = None
        for _ in range(max(1, round(trials / threads))):
            tracker = one()
            if previous is not None:
                ended(previous)
            previous = tracker
        ended(previous)

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]  # daemon: a stopped bench ends
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return done[0], threads * max(1, round(trials / threads)), time.monotonic() - start


def knee(rows: list[dict]) -> str:
    """The first level whose sustained rate is below ``KNEE`` x offered, as 'N trials at once (x/s)'."""
    for r in rows:
        if r["sustained"] < KNEE * r["offered"]:
            return f"{r['threads']} trials at once (offered {r['offered']:.0f}/s, sustained {r['sustained']:.1f}/s)"
    return f"none up to {rows[-1]['threads']} trials at once ({rows[-1]['sustained']:.1f}/s sustained)"


def tracking_backend(label: str, backend_store: str | None, workers: list[int], levels: tuple[int, ...],
                     trial_s: float, trials: int, limit_train: int | None, pattern: Pattern | None) -> Pattern:
    """Record the pattern (once), then each server worker count: both patterns at every level."""
    for w in workers:
        with tempfile.TemporaryDirectory(prefix="bnsweep-bench-") as tmp:
            server = Server(Path(tmp) / "mlruns", w, backend_store)
            try:
                if pattern is None:
                    pattern = record_pattern(server.uri, Path(tmp) / "mlruns", limit_train)
                    print(f"  pattern of one default-study trial (recorded): {len(pattern.calls)} log calls, "
                          f"{pattern.points} metric points, {len(pattern.calls[0][2])} params, "
                          f"{len(pattern.tags) + len(pattern.calls[0][3]) + len(pattern.calls[-1][3])} tags, "
                          f"artifacts {', '.join(sorted(pattern.artifacts))}")
                server.requests()
                server.cpu_since()
                print(f"  {label}, {w} server worker(s); trials of {trial_s:g} s, {trials} (at least one per thread) "
                      "per level; server CPU ms per trial (its processes' own time: what bounds it on an idle machine)")
                print("    at once   offered/s   today: trials/s  req/trial  cpu ms   buffered: trials/s  req/trial"
                      "  cpu ms   ratio req")
                rows = []
                for n in levels:
                    got = {}
                    for name, flush in (("today", 0.0), ("buffered", FLUSH_S)):
                        ended, ran, wall = simulate(server.uri, Path(tmp) / "mlruns", pattern, n, trial_s, trials,
                                                    flush, f"bench-{name}")
                        reqs = server.requests()  # answered ones (a timed-out request may still be answered)
                        got[name] = {"threads": n, "offered": n / trial_s, "sustained": ended / wall,
                                     "per_trial": sum(reqs.values()) / ran, "requests": reqs,
                                     "cpu_ms": 1e3 * server.cpu_since() / ran}
                    rows.append(got)
                    t, b = got["today"], got["buffered"]
                    print(f"    {n:7d}   {n / trial_s:9.1f}   {t['sustained']:15.1f}  {t['per_trial']:9.2f}  "
                          f"{t['cpu_ms']:6.0f}   {b['sustained']:18.1f}  {b['per_trial']:9.2f}  {b['cpu_ms']:6.0f}   "
                          + (f"{t['per_trial'] / b['per_trial']:6.1f}x" if b["per_trial"] and t["per_trial"]
                             else "     -  (no request answered: past the knee)"))
                b_last = rows[-1]["buffered"]["requests"]
                print(f"    buffered requests by kind (last level): {dict(b_last.most_common())}")
                print(f"    knee, today's pattern:   {knee([r['today'] for r in rows])}")
                print(f"    knee, buffered pattern:  {knee([r['buffered'] for r in rows])}")
                cpu = {k: statistics.median(r[k]["cpu_ms"] for r in rows) for k in ("today", "buffered")}
                busy = min(w, worker_count())
                print(f"    server CPU per trial (median over levels): today {cpu['today']:.0f} ms, buffered "
                      f"{cpu['buffered']:.0f} ms: {busy} idle core(s) would hold {1e3 * busy / cpu['today']:.0f} and "
                      f"{1e3 * busy / cpu['buffered']:.0f} trials/s (a bound, not a measurement)")
            finally:
                server.stop()
    return pattern


def optuna_claims(url: str, claimers: int, trials: int) -> tuple[int, float, float, float]:
    """``claimers`` threads claim (``slots.claim``) and complete ``trials`` enqueued trials of one study.

    Returns (trials, seconds, median claim ms, median complete ms).
    """
    import optuna

    from bnsweep.sweep.slots import claim
    from bnsweep.sweep.storage import open_storage

    name = f"bench/{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(storage=open_storage(url), study_name=name)
    for i in range(trials):
        study.enqueue_trial({}, user_attrs={"slot": i})
    claim_ms: list[float] = []
    tell_ms: list[float] = []
    done = [0]
    lock = threading.Lock()

    def worker() -> None:
        storage = open_storage(url)
        mine = optuna.load_study(study_name=name, storage=storage)
        while True:
            t0 = time.perf_counter()
            trial = claim(storage, mine)
            t1 = time.perf_counter()
            if trial is None:
                return
            mine.tell(trial, 0.5)
            t2 = time.perf_counter()
            with lock:
                claim_ms.append((t1 - t0) * 1e3)
                tell_ms.append((t2 - t1) * 1e3)
                done[0] += 1

    start = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(claimers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return done[0], time.monotonic() - start, statistics.median(claim_ms or [0]), statistics.median(tell_ms or [0])


@contextlib.contextmanager
def scratch_database(url: str) -> Iterator[str]:
    """A database of its own on ``url``'s PostgreSQL server, dropped after: MLflow and Optuna both keep an
    ``alembic_version`` table, so one database cannot hold both, and a bench leaves nothing behind."""
    import psycopg

    parts = urllib.parse.urlsplit(url)
    admin = urllib.parse.urlunsplit(parts._replace(scheme="postgresql"))  # libpq's form (no +driver)
    name = f"bnsweep_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with contextlib.suppress(Exception), psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def report_optuna(levels: tuple[int, ...], trials: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storages = [("journal file", None)]
    pg = os.environ.get("BNSWEEP_TEST_PG")
    storages.append(("PostgreSQL", pg) if pg else ("PostgreSQL", ""))
    print(f"\n[tracking] Optuna storage: {trials} enqueued trials claimed (sweep/slots.claim) and completed "
          "(study.tell) by N threads, each with its own storage object")
    for label, url in storages:
        if url == "":
            print(f"  {label}: skipped (set BNSWEEP_TEST_PG=postgresql://... to measure it)")
            continue
        with tempfile.TemporaryDirectory(prefix="bnsweep-bench-") as tmp, (
                scratch_database(url) if url else contextlib.nullcontext(str(Path(tmp) / "bench.journal"))) as target:
            print(f"  {label}\n    claimers   claims+completions/s   median claim ms   median complete ms")
            for n in levels:
                done, wall, c_ms, t_ms = optuna_claims(target, n, max(trials, 2 * n))
                print(f"    {n:8d}   {done / wall:20.1f}   {c_ms:15.1f}   {t_ms:18.1f}")


def report(quick: bool = False, levels: tuple[int, ...] | None = None) -> None:
    """The tracking section of ``bnsweep bench``; ``levels``: trials at once (default 1, 2, 4 ... 64)."""
    import torch

    from bnsweep.tracking.runs import quick_requests

    quick_requests()
    logging.getLogger("bnsweep.tracking").setLevel(logging.ERROR)  # a timed-out request counts as not sustained
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped bench stops its servers too
    levels = levels or ((1, 4) if quick else LEVELS)
    trial_s, trials = (1.0, 4) if quick else (1.0, 8)
    cores = worker_count()
    workers = [cores] if quick else sorted({1, cores})
    print(f"\n[tracking] one MLflow server, simulated trials of the default study's logging pattern; "
          f"{cores} cores, torch threads {torch.get_num_threads()}; flush_s={FLUSH_S:g} (buffered) vs 0 (today)")
    pattern = tracking_backend("SQLite", None, workers, levels, trial_s, trials, 2000 if quick else None, None)
    pg = os.environ.get("BNSWEEP_TEST_PG")
    if pg:
        with scratch_database(pg) as db:
            tracking_backend("PostgreSQL", db, workers, levels, trial_s, trials, None, pattern)
    else:
        print("  PostgreSQL backend: skipped (set BNSWEEP_TEST_PG=postgresql://... to measure it)")
    report_optuna(levels, 16 if quick else 128)
