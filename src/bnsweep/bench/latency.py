"""``make bench`` section ``latency``: no-BN / BN / BN-folded forward passes at batch 1 and 1024, side by side."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

from bnsweep.config import compose, instantiate
from bnsweep.deploy.latency import measure, table, three_models
from bnsweep.training.data import DATASETS


def trained_like(model: nn.Module, seed: int) -> nn.Module:
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
    print(f"\n[latency] median ms per forward pass, torch.inference_mode, {torch.get_num_threads()} threads, "
          "CPU; the three variants interleaved; BN state randomized like a trained model's (gamma > 0)")
    worst = {1: 0.0, 1024: 0.0}
    for label, overrides in BENCH_MODELS.items():
        cfg = compose("train", overrides)
        spec = DATASETS[cfg.data.name]
        torch.manual_seed(0)
        bn = trained_like(instantiate(cfg.model, in_shape=spec.shape, num_classes=spec.num_classes), 0)
        models = three_models(bn, OmegaConf.to_container(cfg.model, resolve=True), spec.shape, spec.num_classes)
        m = measure(models, spec.shape, repeats=400, budget_s=budget_s)
        kinds = sorted({type(x).__name__ for x in models["folded"].children()} - {"Flatten"})
        print(table(f"{label}   folded: {', '.join(kinds)}", m))
        for b in worst:
            worst[b] = max(worst[b], m[f"latency_b{b}_ratio_folded_nobn"])
    print(f"  worst ratio folded / no-BN: batch 1 {worst[1]:.2f}x, batch 1024 {worst[1024]:.2f}x   (bar: <= 1.05)")
