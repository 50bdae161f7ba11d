"""A DDP worker's ranks: rank 0 claims and reports; the others train their shard of each trial it shares.

RANK/WORLD_SIZE are set by ``launch_local.rank_env`` (or the cluster); one process group serves the worker's life.
"""

from __future__ import annotations

import logging
import os
import traceback

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from bnsweep.training.run import run_training

log = logging.getLogger("bnsweep.worker")


def join_ranks() -> tuple[int, int, object]:
    """This process's rank, the world size and the gloo group that carries trial configs (None alone)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():  # one process group for the worker's life
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, dist.new_group(backend="gloo") if world > 1 else None


class Ranks:
    """Part of ``worker.Worker``: what passes between its DDP ranks."""

    def share(self, obj: object) -> None:
        """DDP: rank 0 sends the next trial's config (None: no trial left) to the other ranks."""
        if self.world > 1:
            dist.broadcast_object_list([obj], src=0, group=self.control)

    def follow(self) -> int:
        """DDP ranks > 0: train each config rank 0 shares, reporting nothing, until it says stop."""
        while True:
            box: list = [None]
            dist.broadcast_object_list(box, src=0, group=self.control)
            if box[0] is None:
                return self.done
            cfg = OmegaConf.create(box[0])
            try:
                run_training(cfg, datamodule=self.datamodule(cfg), track=False)
            except Exception:
                log.error("rank %d: trial failed:\n%s", self.rank, traceback.format_exc())
            self.done += 1
