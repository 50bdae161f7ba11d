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

from bnsweep.config import instantiate
from bnsweep.fold import fold_bn

NAMES = ("nobn", "bn", "folded")
LABELS = {"nobn": "no BN", "bn": "BN (eval)", "folded": "BN folded"}


def three_models(model: nn.Module, model_cfg: Mapping[str, Any], in_shape: Sequence[int],
                 num_classes: int) -> dict[str, nn.Module]:
    """The trained BN model, its folded copy, and the same architecture built without any BN."""
    cfg = copy.deepcopy(dict(model_cfg))
    cfg["bn"] = {**dict(cfg.get("bn") or {}), "placement": "none", "input": False}
    nobn = instantiate(cfg, in_shape=tuple(in_shape), num_classes=num_classes)
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


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN state like a trained model's: running stats and gamma/beta away from 0/1 (gamma > 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


BENCH_MODELS = {  # label -> train-config overrides
    "MLP seed001_bn (784-300-100-10, input BN + BN after act)": ["experiment=seed001_bn"],
    "CNN conv32-conv64-fc128, BN before act": ["model=cnn", "model.bn.placement=before_act"],
    "CNN conv32-conv64-fc128, input BN + BN after act": ["model=cnn", "model.bn.placement=after_act",
                                                         "model.bn.input=true"],
}


def report(budget_s: float = 3.0) -> None:
    """``make bench`` section: each model's three variants side by side at batch 1 and 1024."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bnsweep.data import DATASETS
    from bnsweep.train import CONF_DIR

    print(f"\n[latency] median ms per forward pass, torch.inference_mode, {torch.get_num_threads()} threads, "
          "CPU; the three variants interleaved; BN state randomized like a trained model's (gamma > 0)")
    worst = {1: 0.0, 1024: 0.0}
    for label, overrides in BENCH_MODELS.items():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        spec = DATASETS[cfg.data.name]
        torch.manual_seed(0)
        bn = _trained_like(instantiate(cfg.model, in_shape=spec.shape, num_classes=spec.num_classes), 0)
        models = three_models(bn, OmegaConf.to_container(cfg.model, resolve=True), spec.shape, spec.num_classes)
        m = measure(models, spec.shape, repeats=400, budget_s=budget_s)
        kinds = sorted({type(x).__name__ for x in models["folded"].children()} - {"Flatten"})
        print(table(f"{label}   folded: {', '.join(kinds)}", m))
        for b in worst:
            worst[b] = max(worst[b], m[f"latency_b{b}_ratio_folded_nobn"])
    print(f"  worst ratio folded / no-BN: batch 1 {worst[1]:.2f}x, batch 1024 {worst[1024]:.2f}x   (bar: <= 1.05)")
