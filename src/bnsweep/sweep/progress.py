"""The driver's progress: the workers run to their end under one progress bar, or are stopped cleanly."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator

from mlflow.exceptions import MlflowException
from optuna.trial import TrialState
from tqdm import tqdm

from bnsweep.sweep import table
from bnsweep.sweep.slots import counts
from bnsweep.tracking.runs import mark_killed, summary_run

log = logging.getLogger("bnsweep.sweep")


class Progress:
    """Part of ``state.Sweep``: running its workers and watching them."""

    def totals(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for study in self.studies:
            for k, v in counts(study).items():
                c[k] = c.get(k, 0) + v
        return c

    def run_workers(self, n_workers: int, quiet: bool = False, attach: bool = False) -> float:
        """Run the workers to the end with one progress bar; return the wall time.

        ``attach``: start none, watch those an earlier command started (``launcher.wait=false``).
        """
        total = (self.spec.n_trials + self.spec.repeats) * len(self.spec.cells())
        start = time.perf_counter()
        if not attach:
            self.spawn(0, n_workers)
        respawns = n_workers
        bar = tqdm(total=total, desc=f"sweep {self.spec.name}", unit="trial", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0, disable=quiet)
        announced: set[str] = set()
        last_check = time.monotonic()
        shown, live = None, sys.stderr.isatty()  # in a log file: a line only when the counts change
        try:
            while True:
                alive = self.launcher.alive()
                c = self.totals()
                finished = c.get("complete", 0) + c.get("pruned", 0) + c.get("diverged", 0) + c.get("fail", 0)
                finished += c.get("skipped", 0)  # LR slots the bracketing search did not need (sweep/search.py)
                bar.n = min(finished, total)
                bar.set_postfix_str(f"running {c.get('running', 0)}, pruned {c.get('pruned', 0)}, "
                                    f"diverged {c.get('diverged', 0)}, failed {c.get('fail', 0)}"
                                    f"{', retried ' + str(c['lost']) if c.get('lost') else ''}", refresh=False)
                if live or c != shown:
                    bar.refresh()
                    shown = c
                self.announce_cells(bar, announced)
                if time.monotonic() - last_check > 5 or not alive:
                    last_check = time.monotonic()
                    left = self.recover() or self.totals().get("waiting", 0)
                    if left and not alive and respawns < (1 + self.respawns_per_worker) * n_workers:
                        self.spawn(respawns, 1)  # a retried trial and nobody left to run it
                        respawns += 1
                        continue
                if not alive:
                    break
                self.launcher.pause(1.0)  # local: wakes at once when a worker ends
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see ``driver.stop_on_sigterm``)
            bar.close()
            self.stop_workers()
            raise
        bar.close()
        if self.launcher.failed():
            log.warning("%d worker(s) stopped with an error; see %s", self.launcher.failed(), self.log_dir)
        return time.perf_counter() - start

    def stop_workers(self) -> None:
        """Stopped: the workers give their trials back and end their runs KILLED; so do the cell and summary runs.

        Nothing is left RUNNING and nothing is lost: the same command resumes where this one stopped.
        """
        with stop_ignored():  # a second Ctrl-C must not cut the giving back short
            self.launcher.stop()
            join = getattr(self.launcher, "join", None)
            if join is not None:
                join(self.stop_wait_s)
            try:
                self.recover()  # trials of workers that died before giving them back
                for study in self.studies:
                    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                    mark_killed(self.client, self.experiment_id, study.study_name, failed)
                    self.client.set_terminated(study.user_attrs["mlflow_parent_run_id"], "KILLED")
                self.client.set_terminated(summary_run(self.client, self.experiment_id, self.spec.name), "KILLED")
            except Exception as e:  # MLflow away: the next run ends them (finish, mark_killed)
                log.warning("could not end the sweep's MLflow runs: %s", e)
        print("sweep stopped; its workers gave their trials back. Run the same command again to resume.",
              file=sys.stderr)

    def announce_cells(self, bar: tqdm, announced: set[str]) -> None:
        for study in self.studies:
            cell = study.user_attrs["cell"]
            c = counts(study)
            if cell in announced or c.get("waiting") or c.get("running"):
                continue
            announced.add(cell)
            row = table.cell_row(study, self.spec.target_acc)
            try:
                self.log_cell(study, row)  # on the dashboard as soon as the cell is done
            except (OSError, MlflowException) as e:  # MLflow away: finish() logs the row again
                log.warning("cell %s: could not log its row to MLflow now (%s); the sweep's end will", cell,
                            type(e).__name__)
            best = (f"best val_acc {row['best_val_acc']:.4f} at lr {row['best_lr']:.3g}"
                    if not math.isnan(row["best_val_acc"]) else "no completed trial")
            bar.write(f"  done: {cell:<40} {best}")


@contextlib.contextmanager
def stop_ignored() -> Iterator[None]:
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
