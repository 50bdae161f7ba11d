"""Inference latency of one architecture three ways: without BN, with BN (eval mode), BN folded.

Timings are medians of many single forward passes under ``torch.inference_mode``, after a warmup,
with the three models interleaved (call i of each model runs back to back, in rotating order) so
that drift in the machine's speed hits all three alike. Only ratios measured in one call compare.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bnsweep.deploy.fold import fold_bn
from bnsweep.training.checkpoint import build_model

NAMES = ("nobn", "bn", "folded")


def three_models(model: nn.Module, model_cfg: Mapping[str, Any], in_shape: Sequence[int],
                 num_classes: int) -> dict[str, nn.Module]:
    """The trained BN model, its folded copy, and the same architecture built without any BN."""
    cfg = copy.deepcopy(dict(model_cfg))
    cfg["norm"] = {**dict(cfg.get("norm") or {}), "kind": "none", "input": False}
    cfg["bn"] = {**dict(cfg.get("bn") or {}), "placement": "none", "input": False}  # a file's old form, if any
    nobn = build_model(cfg, in_shape, num_classes)  # our classes only: model_cfg comes from a model file
    return {"nobn": nobn.eval(), "bn": model.eval(), "folded": fold_bn(model, in_shape)}


def measure(models: Mapping[str, nn.Module], in_shape: Sequence[int], batches: Sequence[int] = (1, 1024),
            repeats: int = 200, warmup: int = 5, budget_s: float | None = None,
            seed: int = 0) -> dict[str, float]:
    """Median ms per forward pass: ``latency_b{batch}_ms_{name}``, plus ``latency_b{batch}_ratio_{name}_nobn``.

    ``budget_s`` caps the timed calls per batch size (at least 10 rounds), so a big CNN at batch
    1024 does not take minutes.
    """
    gen = torch.Generator().manual_seed(seed)
    names = list(models)
    out: dict[str, float] = {}
    with torch.inference_mode():
        for batch in batches:
            x = torch.rand(batch, *in_shape, generator=gen)
            cost = 0.0
            for model in models.values():
                spent = []
                for _ in range(max(warmup, 1)):
                    start = time.perf_counter()
                    model(x)
                    spent.append(time.perf_counter() - start)
                    if budget_s is not None and len(spent) > 1 and sum(spent) > budget_s / 4:
                        break  # a slow model is warm after two calls
                cost += min(spent)
            rounds = repeats if budget_s is None else max(10, min(repeats, int(budget_s / max(cost, 1e-9))))
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(rounds):
                for i in range(len(names)):
                    name = names[(r + i) % len(names)]
                    start = time.perf_counter()
                    models[name](x)
                    times[name].append(time.perf_counter() - start)
            for name in names:
                out[f"latency_b{batch}_ms_{name}"] = statistics.median(times[name]) * 1e3
            if "nobn" in models:
                for name in names:
                    if name != "nobn":
                        out[f"latency_b{batch}_ratio_{name}_nobn"] = (out[f"latency_b{batch}_ms_{name}"]
                                                                      / out[f"latency_b{batch}_ms_nobn"])
    return out


def table(title: str, metrics: Mapping[str, float], batches: Sequence[int] = (1, 1024)) -> str:
    """Side-by-side milliseconds and the folded / no-BN ratio (bar: <= 1.05)."""
    lines = [f"  {title}",
             f"    {'batch':>5}  {'no BN':>10}  {'BN (eval)':>10}  {'BN folded':>10}  {'folded/no-BN':>12}  "
             f"{'BN/no-BN':>9}"]
    for b in batches:
        ms = [metrics[f"latency_b{b}_ms_{n}"] for n in NAMES]
        lines.append(f"    {b:>5}  {ms[0]:>8.3f}ms  {ms[1]:>8.3f}ms  {ms[2]:>8.3f}ms  "
                     f"{metrics[f'latency_b{b}_ratio_folded_nobn']:>11.2f}x  "
                     f"{metrics[f'latency_b{b}_ratio_bn_nobn']:>8.2f}x")
    return "\n".join(lines)
