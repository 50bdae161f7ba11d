"""CPU, memory, disk, network and GPU use over a sweep, logged with MLflow's own system-metrics monitor.

One monitored run per machine and sweep (the local driver's ``summary`` run), not one per trial: a
trial lasts seconds, while a machine's load over the whole sweep is what tells a researcher whether
the workers kept the cores (or the GPU) busy. The monitor is a daemon thread that samples every
``SYSTEM_METRICS_S`` and sends one ``log_batch`` per sample; it stops (and flushes) when the block
ends. Keys are MLflow's: ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``,
``system/gpu_0_utilization_percentage``, ... (``system/<node>/...`` with a node name), shown on the
run's "System metrics" tab. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides the interval.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("bnsweep.tracking")
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started/stopped monitoring" lines
SYSTEM_METRICS_S = 10.0  # one sample (and one request) per 10 s: a sweep's load curve, no cost to training


def _monitor(uri: str, run_id: str, interval_s: float, node: str | None) -> Any:
    """MLflow's SystemMetricsMonitor, sampling at the end of each interval and once more at the end.

    MLflow's own loop samples at the start of an interval (psutil's first CPU reading is 0) and drops
    the last, unfinished one; a sweep shorter than the interval would log nothing, a short one a 0.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        def monitor(self) -> None:
            self.collect_metrics()  # psutil's CPU baseline (kept per thread): the next reading covers the interval
            for m in self.monitors:
                m.clear_metrics()
            while True:  # every interval, and once more (the last, partial one) when told to stop
                stopping = self._shutdown_event.wait(self.sampling_interval)
                if not self.sample() or stopping:
                    return  # finish() joins this thread, then sends what is left

        def sample(self) -> bool:
            try:
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
                return True
            except Exception as e:  # the server went away: training goes on without metrics
                log.warning("system metrics stopped: %s", e)
                return False

    return Monitor(run_id, sampling_interval=interval_s, resume_logging=True, node_id=node, tracking_uri=uri)


@contextmanager
def system_metrics(uri: str, run_id: str, interval_s: float = SYSTEM_METRICS_S,
                   node: str | None = None) -> Iterator[Any]:
    """Sample this machine into run ``run_id`` while the block runs: every ``interval_s`` and at the end.

    Steps continue those logged earlier, so a resumed sweep extends its curves. Without psutil the
    block runs unmonitored, with a warning: metrics are an aid, never a reason to stop a sweep.
    """
    try:
        monitor = _monitor(uri, run_id, interval_s, node)
    except ImportError as e:
        log.warning("no system metrics (%s); pip install psutil nvidia-ml-py", e)
        yield None
        return
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()
