"""How close a section comes to the machine's limit: a large float32 matmul on the same threads and device.

A dense model's training is matmuls (forward, and twice that backward); the fraction of the matmul
peak it reaches says how much room is left, and FLOPs / peak is the floor no loop can beat.
"""

from __future__ import annotations

import math
import time
from functools import cache

import torch
from torch import nn


@cache
def matmul_peak(device: torch.device | str = "cpu", threads: int | None = None, n: int = 1024,
                seconds: float = 1.0) -> float:
    """FLOP/s of a large float32 matmul on ``threads`` CPU threads (None: the current number), or on the GPU:
    what this machine can do at best. Measured once per device and thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads or old)
    try:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        best, reps = math.inf, 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or reps < 3:
            start = time.perf_counter()
            (a @ b).sum().item()  # the .item() waits for a GPU
            best, reps = min(best, time.perf_counter() - start), reps + 1
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / best


def linear_flops(model: nn.Module) -> int:
    """Forward FLOPs of one input through the Linear layers (2 per multiply-add)."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def epoch_flops(model: nn.Module, n_train: int, n_eval: int) -> int:
    """One epoch: forward + backward (3x forward) over the training set, forward over the evaluated inputs."""
    return linear_flops(model) * (3 * n_train + n_eval)


def at_peak(flops: float, seconds: float, peak: float) -> str:
    """'x% of matmul peak, floor y s': the achieved fraction and the time the work would take at the peak."""
    return f"{flops / seconds / peak:6.1%} of matmul peak (floor {flops / peak:.2f} s)"
