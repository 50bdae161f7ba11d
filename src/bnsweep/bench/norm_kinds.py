"""``make bench ARGS="--only norms"``: what each ``model.norm.kind`` costs, relative to no normalization.

Per architecture (the MLP 784-300-100-10 and the CNN conv32-conv64-fc128, norms before the activation), every
kind is built from the same config but ``model.norm.kind`` and measured side by side, interleaved round by
round so the machine's drift hits all kinds alike:

- training: median seconds of one step (forward, loss, backward, SGD step) at batch 32, one thread, as a sweep
  worker trains one trial; and one step of a population of K members (``population/loop.py``), per member;
- inference: median ms of one eval-mode forward at batch 1 and 1024, and of its folded copy where the kind has
  running statistics (batch, ghost_batch, batch_renorm); layer, group and instance norms cannot fold.

A kind "keeps the population's speed" when its per-member population step, relative to its own single step,
is at least 80% of no normalization's; otherwise the line says it loses, with the share of a single step its
norm layers take (their forward and backward alone).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from bnsweep.config import compose, instantiate
from bnsweep.deploy.fold import fold_bn
from bnsweep.deploy.latency import measure
from bnsweep.errors import ConfigError
from bnsweep.population.auto import Candidate
from bnsweep.training.data import DATASETS
from bnsweep.training.norms import BATCH_KINDS, KINDS, kind_of

ARCHS = {  # label -> train-config overrides (every kind adds model.norm.kind=...)
    "MLP 784-300-100-10": ["model=mlp", "data.limit_train=2000"],
    "CNN conv32-conv64-fc128": ["model=cnn", "data.limit_train=2000"],
}
KEEP = 0.8  # a kind keeps the population's speed if its K-member speedup is >= this x no normalization's


def kinds_for(overrides: Sequence[str]) -> list[str]:
    """The kinds this architecture takes (instance norm: conv layers only)."""
    return [k for k in KINDS if k != "instance" or "model=cnn" in overrides]


def train_step_s(cfg, dm, k: int, steps: int) -> float:
    """Median seconds of one training step of K members (K=1: the plain model and torch's SGD)."""
    cand = Candidate(cfg, dm, k, torch.device("cpu"))
    cand.step_s(3)  # warm up
    return cand.step_s(steps)


def norm_layer_s(model: nn.Module, x: torch.Tensor, steps: int) -> float:
    """Seconds of the norm layers' forward + backward in one training step of this single model."""
    spent = 0.0
    for module in model.modules():
        if kind_of(module) is None:
            continue
        captured: list[torch.Tensor] = []
        hook = module.register_forward_hook(lambda _m, inp, _out, c=captured: c.append(inp[0].detach()))
        model.train()
        model(x)
        hook.remove()
        inp = captured[0].requires_grad_(True)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            module(inp).sum().backward()
            times.append(time.perf_counter() - start)
        spent += statistics.median(times)
    return spent


def bench(steps: int = 40, rounds: int = 3, k: int = 8, budget_s: float = 1.0,
          archs: Sequence[str] | None = None,
          batches: Sequence[int] = (1, 1024)) -> dict[str, dict[str, dict[str, float]]]:
    """arch -> kind -> measurements (s per step single / per member in a population, latencies)."""
    torch.set_num_threads(1)  # as a sweep worker
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arch in archs or ARCHS:
        overrides = ARCHS[arch]
        kinds = kinds_for(overrides)
        cfgs = {kind: compose("train", [*overrides, f"model.norm.kind={kind}", "threads=1"]) for kind in kinds}
        dm = instantiate(cfgs["none"].data)
        dm.setup("fit")
        spec = DATASETS[cfgs["none"].data.name]
        rows: dict[str, dict[str, list[float]]] = {kind: {"single": [], "member": [], "norm": []} for kind in kinds}
        for r in range(rounds):
            for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:  # rotating order
                row = rows[kind]
                row["single"].append(train_step_s(cfgs[kind], dm, 1, steps))
                try:
                    row["member"].append(train_step_s(cfgs[kind], dm, k, steps) / k)
                except ConfigError:
                    row["member"].append(float("nan"))
                torch.manual_seed(0)
                model = instantiate(cfgs[kind].model, in_shape=dm.in_shape, num_classes=dm.num_classes)
                row["norm"].append(norm_layer_s(model, dm.tensors["train_x"][:32], steps // 2))
        out[arch] = {kind: {key: statistics.median(v) for key, v in row.items()} for kind, row in rows.items()}
        torch.manual_seed(0)
        for kind in kinds:  # inference: the kind, its folded copy where it folds, against no normalization
            torch.manual_seed(0)
            model = instantiate(cfgs[kind].model, in_shape=spec.shape, num_classes=spec.num_classes).eval()
            torch.manual_seed(0)
            plain = instantiate(cfgs["none"].model, in_shape=spec.shape, num_classes=spec.num_classes).eval()
            models = {"nobn": plain, "bn": model}
            if kind in BATCH_KINDS:
                models["folded"] = fold_bn(model, spec.shape)
            m = measure(models, spec.shape, batches=batches, repeats=200, budget_s=budget_s)
            out[arch][kind] |= {key: v for key, v in m.items() if key.startswith("latency_")}
    return out


def _cell(m: dict[str, float], batch: int, name: str) -> str:
    key = f"latency_b{batch}_ratio_{name}_nobn"
    return f"{m[key]:5.2f}x" if key in m else "  -   "


def report(steps: int = 40, rounds: int = 3, k: int = 8, budget_s: float = 1.0,
           batches: Sequence[int] = (1, 1024)) -> None:
    print(f"\n[norms] each model.norm.kind vs none, measured side by side ({rounds} interleaved rounds, 1 thread, "
          f"CPU): training step at batch 32 (single, and per member of a K={k} population), its norm layers' "
          f"share, eval-mode forward at batch {' / '.join(map(str, batches))} (folded where the kind has running "
          "statistics)")
    results = bench(steps, rounds, k, budget_s, batches=batches)
    small, large = batches[0], batches[-1]
    for arch, kinds in results.items():
        none = kinds["none"]
        base_gain = none["single"] / none["member"]
        print(f"  {arch}")
        print(f"    {'kind':<13} {'train step':>10} {'vs none':>8} {'norms':>6} {'K-pop/member':>13} {'vs none':>8} "
              f"{'pop gain':>8}   {f'b{small} eval':>7} {'folded':>7} {f'b{large} eval':>10} {'folded':>7}")
        losers = []
        for kind, m in kinds.items():
            gain = m["single"] / m["member"] if m["member"] == m["member"] else float("nan")
            share = m["norm"] / m["single"]
            print(f"    {kind:<13} {m['single'] * 1e3:8.2f}ms {m['single'] / none['single']:7.2f}x {share:6.0%} "
                  f"{m['member'] * 1e3:11.3f}ms {m['member'] / none['member']:7.2f}x {gain:7.1f}x   "
                  f"{_cell(m, small, 'bn'):>7} {_cell(m, small, 'folded'):>7} {_cell(m, large, 'bn'):>10} "
                  f"{_cell(m, large, 'folded'):>7}")
            if kind != "none" and not gain >= KEEP * base_gain:
                losers.append(f"{kind} (population gain {gain:.1f}x vs none's {base_gain:.1f}x; its norm layers "
                              f"take {share:.0%} of a single step)")
        print("    population keeps its speed for every kind (gain within "
              f"{1 - KEEP:.0%} of none's)" if not losers else "    population loses on: " + "; ".join(losers))
    print("  (train step, inference: ratio to no normalization, same architecture; '-': layer/group/instance cannot "
          "fold, or the kind has no running statistics)")

