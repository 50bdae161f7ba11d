"""The driver's side of starting workers: each dataset decoded once, the worker's arguments, ranks per worker.

How processes start is the launcher's (``launch_local``, ``launch_slurm``).
"""

from __future__ import annotations

import functools

from omegaconf import OmegaConf

from bnsweep.config import compose, instantiate


class Launch:
    """Part of ``state.Sweep``: what its workers need to start."""

    def prepare_data(self) -> None:
        """Decode each dataset once here, so parallel workers only read the cache."""
        seen = set()
        for cell in self.spec.cells():
            data = compose("train", cell.overrides).data
            key = OmegaConf.to_yaml(data, resolve=True)
            if key not in seen:
                seen.add(key)
                instantiate(data).prepare_data()

    def worker_args(self) -> list[str]:
        """Arguments of ``bnsweep worker``: the same worker on this machine or a cluster."""
        return ["--storage", self.storage_url, "--sweep", self.spec.name, "--tracking-uri", self.uri,
                "--threads", "1", "--heartbeat-s", str(self.heartbeat_s), "--stale-after-s", str(self.stale_after_s),
                "--storage-wait-s", str(self.storage_wait_s)]

    @functools.cached_property
    def ranks(self) -> int:
        """Processes per worker: ``trainer.devices`` under a DDP strategy (the first cell's), else 1."""
        trainer = compose("train", self.spec.cells()[0].overrides).trainer
        strategy = trainer.get("strategy", "auto")
        name = strategy if isinstance(strategy, str) else strategy.get("_target_", "")
        return int(trainer.devices) if "ddp" in name.lower() and isinstance(trainer.devices, int) else 1

    def spawn(self, first: int, count: int) -> None:
        self.launcher.start(self.worker_args(), self.log_dir, first, count, self.ranks)
