"""Sweep workers as a SLURM job array (``launcher=slurm``), submitted with submitit.

SLURM schedules, Optuna (the storage) and MLflow (the server) hold all the state: each array task
runs ``bnsweep worker`` attached to them, with ``--recover`` so that the workers themselves retry a
trial whose job died, and the sweep completes even when the submitting command has left.
A job runs ``workers_per_node`` workers (SLURM tasks), each pinned to its own GPU(s); a DDP
worker is ``ranks`` consecutive tasks.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnsweep.defaults import SLURM_COMMAND_TIMEOUT_S, SLURM_POLL_S
from bnsweep.errors import ConfigError, check_range, redact
from bnsweep.sweep.launch_local import apply_env, rank_env
from bnsweep.sweep.slots import slurm_job

log = logging.getLogger("bnsweep.cluster")
JOBS_FILE = "slurm_jobs.txt"  # job ids of the sweep's workers, for ``action=status`` to re-attach


def pin_devices(slot: int, per_slot: int) -> None:
    """Give this task the GPUs of its slot on the node (SLURM sets the job's CUDA_VISIBLE_DEVICES)."""
    if per_slot <= 0:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(per_slot * (slot + 1))]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices[slot * per_slot:(slot + 1) * per_slot])


@dataclass(frozen=True)
class RequeuePolicy:
    """What a stopped worker's job does: ``launcher.requeue`` and ``launcher.max_num_timeout``."""

    on: bool = True
    max_num_timeout: int = 3


def _job_field(job: str, key: str) -> str | None:
    """One field of ``scontrol show job`` for this job (None if SLURM does not answer)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in out.stdout.split():
        if word.startswith(f"{key}="):
            return word.split("=", 1)[1]
    return None


def requeue_after_stop(why: str, requeue: RequeuePolicy) -> None:
    """A stopped worker's job, once its trial is given back: requeued if SLURM stopped it for
    preemption or the time limit (and ``launcher.requeue``), left to end if it was cancelled.

    SLURM requeues a preempted job itself only if the job outlives the grace time; a worker that gave its
    trial back has nothing left to do, so it requeues its job at once (as submitit does at the time limit)
    and the node goes to the preemptor without waiting out the grace time.
    """
    # an array task by its own name: the raw SLURM_JOB_ID of the array's first task is the array's id, and
    # ``scontrol requeue <array id>`` would requeue every task of the array
    job = slurm_job()
    if not job or not requeue.on:
        return
    if why == "time":  # launcher.signal_delay_s before the time limit
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        if restarts >= requeue.max_num_timeout:
            log.warning("job %s near its time limit, requeued %d time(s) already (launcher.max_num_timeout): "
                        "it ends here", job, restarts)
            return
    elif _job_field(job, "PreemptTime") in (None, "None"):
        return  # scancel, scontrol requeue (SLURM requeues it itself), or the time limit itself
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        log.info("job %s %s: its trial was given back and the job requeued", job,
                 "preempted" if why == "term" else "near its time limit")
    else:
        log.warning("job %s could not be requeued: %s", job, done.stderr.strip() or done.stdout.strip())


def worker_task(argv: list[str], first_offset: int, ranks: int, gpus_per_worker: int,
                requeue: RequeuePolicy = RequeuePolicy()) -> None:
    """One SLURM task: a worker (or one DDP rank of it) on its own GPU(s); runs in the job.

    SIGTERM (scancel, preemption, ``scontrol requeue``, the time limit) and submitit's USR2
    (``launcher.signal_delay_s`` before the time limit) both stop the worker as Ctrl-C does: it hands
    its trial back at once (a copy in the same slot), well within SLURM's grace or kill wait time.
    submitit's own USR2 handler would fail the running trial instead (it expects checkpointing jobs).
    """
    import submitit

    env = submitit.JobEnvironment()
    slot, rank = divmod(env.local_rank, ranks)
    pin_devices(slot, gpus_per_worker * ranks)
    port = 20000 + (int(env.raw_job_id) * 8 + slot) % 30000  # distinct per job and worker on a node
    apply_env(rank_env(rank, ranks, port))
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    why = ["term"]

    def time_is_up(signum: int, frame: object) -> None:
        why[0] = "time"
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's own stop: give the trial back, end its run

    signal.signal(submitit.JobEnvironment._usr_sig(), time_is_up)
    from bnsweep.sweep.worker import ON_STOP, main

    if env.local_rank == 0:  # once the stopped worker has given its trial back: requeue the job?
        ON_STOP.append(lambda: requeue_after_stop(why[0], requeue))
    main([*argv, "--seed-offset", str(first_offset + slot), "--recover"])


@dataclass
class SlurmLauncher:
    """Config ``launcher=slurm`` (conf/launcher/slurm.yaml): how the workers are asked of SLURM."""

    workers: int = 2
    workers_per_node: int = 1
    gpus_per_worker: int = 1
    cpus_per_worker: int = 2
    mem_gb: float = 8
    time_min: int = 240
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    python: str | None = None
    wait: bool = True
    folder: str | None = None
    requeue: bool = True
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    poll_s: float = SLURM_POLL_S
    command_timeout_s: float = SLURM_COMMAND_TIMEOUT_S
    job_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_range("launcher.workers", self.workers, 1)
        check_range("launcher.workers_per_node", self.workers_per_node, 1)
        check_range("launcher.gpus_per_worker", self.gpus_per_worker, 0)
        check_range("launcher.cpus_per_worker", self.cpus_per_worker, 1)
        check_range("launcher.time_min", self.time_min, 1)
        check_range("launcher.signal_delay_s", self.signal_delay_s, 1)
        check_range("launcher.max_num_timeout", self.max_num_timeout, 0)
        check_range("launcher.poll_s", self.poll_s, 0, low_open=True)
        check_range("launcher.command_timeout_s", self.command_timeout_s, 0, low_open=True)
        self._last_check, self._alive = 0.0, 0

    # ------------------------------------------------------------------ submission

    def executor(self, folder: Path, ranks: int, tasks: int):
        import submitit

        ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm", slurm_python=self.python)
        sbatch = {"requeue" if self.requeue else "no_requeue": True, **self.sbatch}
        params: dict[str, Any] = {
            "name": f"bnsweep-{folder.parent.name}", "timeout_min": self.time_min, "nodes": 1,
            "tasks_per_node": tasks * ranks, "cpus_per_task": self.cpus_per_worker,
            "mem_gb": self.mem_gb * tasks, "slurm_additional_parameters": sbatch,
            "slurm_signal_delay_s": self.signal_delay_s, "slurm_setup": list(self.setup)}
        if self.gpus_per_worker:
            params["gpus_per_node"] = self.gpus_per_worker * ranks * tasks
        for key in ("partition", "account", "qos", "array_parallelism"):
            if getattr(self, key) is not None:
                params[f"slurm_{key}"] = getattr(self, key)
        ex.update_parameters(**params)
        return ex

    def start(self, argv: list[str], log_dir: Path, first: int, count: int, ranks: int = 1) -> list[str]:
        """Submit ``count`` workers (seed offsets ``first ..``) as one array; return the job ids."""
        per_job = min(self.workers_per_node, count)
        jobs_n = math.ceil(count / per_job)
        folder = Path(self.folder) if self.folder else log_dir / "slurm"
        ex = self.executor(folder, ranks, per_job)
        offsets = [first + j * per_job for j in range(jobs_n)]
        try:
            policy = RequeuePolicy(self.requeue, self.max_num_timeout)
            jobs = ex.map_array(worker_task, [argv] * jobs_n, offsets, [ranks] * jobs_n,
                                [self.gpus_per_worker] * jobs_n, [policy] * jobs_n)
        except Exception as e:  # sbatch's own message: unknown partition, account, too much memory...
            raise ConfigError(f"launcher=slurm: sbatch refused the workers: {str(e).strip().splitlines()[-1]}") from e
        ids = [j.job_id for j in jobs]
        self.job_ids += ids
        with (log_dir / JOBS_FILE).open("a") as f:
            f.writelines(f"{i}\n" for i in ids)
        self._last_check = 0.0
        log.info("submitted %d SLURM job(s) %s; logs in %s", len(ids), ", ".join(ids), folder)
        return ids

    def attach(self, log_dir: Path) -> int:
        """Pick up the jobs an earlier ``launcher.wait=false`` submitted; return how many still queue or run."""
        path = log_dir / JOBS_FILE
        self.job_ids = path.read_text().split() if path.exists() else []
        return self.alive()

    # ------------------------------------------------------------------ watching

    def alive(self) -> int:
        """Jobs pending or running (squeue, at most every ``poll_s``)."""
        if not self.job_ids:
            return 0
        if time.monotonic() - self._last_check < self.poll_s:
            return self._alive
        self._last_check = time.monotonic()
        arrays = sorted({i.split("_")[0] for i in self.job_ids})
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(arrays)], capture_output=True,
                             text=True, timeout=self.command_timeout_s)
        mine = set(self.job_ids)
        self._alive = sum(line.strip() in mine for line in out.stdout.splitlines())
        return self._alive

    def pause(self, timeout: float) -> None:
        time.sleep(timeout)

    def stop(self) -> None:
        if self.job_ids:
            subprocess.run(["scancel", *self.job_ids], capture_output=True, timeout=self.command_timeout_s)

    def failed(self) -> int:
        return 0  # a job's failure shows in its trials (retried) and its log, not here

    def describe(self) -> str:
        return f"{len(self.job_ids)} SLURM job(s) ({', '.join(self.job_ids)})"


def reattach_hint(argv: list[str] | None = None) -> str:
    """The command that follows a detached sweep: the same one, with ``action=status`` (passwords as ***)."""
    args = [redact(a) for a in (argv or sys.argv[1:]) if not a.startswith(("action=", "launcher.wait="))]
    return f"bnsweep sweep {shlex.join(args)} action=status"
