"""The driver's account of what a sweep used: this machine's system metrics, and fit/evaluation/busy time."""

from __future__ import annotations

import contextlib
import math
from typing import Any

from bnsweep.sweep.launch_local import LocalLauncher
from bnsweep.tracking.runs import summary_run
from bnsweep.tracking.system import system_metrics


class Usage:
    """Part of ``state.Sweep``: its resource use."""

    def monitored(self) -> Any:
        """This machine's CPU/memory/GPU use while local workers run, on the sweep's summary run.

        Cluster workers run elsewhere: this machine's load would say nothing about them.
        """
        if not isinstance(self.launcher, LocalLauncher):
            return contextlib.nullcontext()
        run_id = summary_run(self.client, self.experiment_id, self.spec.name)
        self.client.update_run(run_id, status="RUNNING")  # finish() ends it
        return system_metrics(self.uri, run_id)

    def timing(self) -> dict[str, float]:
        """Summed fit and test-evaluation time, trials run, and summed claim-to-finish time."""
        fit, evaluation, n, spans = 0.0, 0.0, 0, {}
        for study in self.studies:
            for t in study.get_trials(deepcopy=False):
                m, run = t.user_attrs.get("metrics"), t.user_attrs.get("run")
                if m and run and "runtime_s" in m:
                    fit, n = fit + m["runtime_s"], n + 1
                    evaluation += m.get("eval_time_s", 0.0)
                    w = t.user_attrs["worker"]
                    first, last = spans.get(w["pid"], (math.inf, 0.0))
                    spans[w["pid"]] = (min(first, w["claimed_at"]), max(last, run["finished_at"]))
        # busy: each worker's first claim to last finish, i.e. everything but process start-up
        return {"fit_s": fit, "eval_s": evaluation, "trials": n, "busy_s": sum(b - a for a, b in spans.values())}
