"""``make bench ARGS="--only population"``: trials/hour of population training, side by side.

The seeds' MNIST BN MLP (experiment=seed001_bn, 55k images), one cell, the same epochs, one torch
thread as a sweep worker. K=1 is the ordinary path (``run_training``, one trial at a time); K=8, 32
(and 128 on a GPU) are populations (``run_population``) over the same log-spaced learning rates.
Rounds interleave the sizes, so the machine's drift hits all of them. A trial's cost is everything
but MLflow: building the model, training, validation, test and precise BN. The fraction of matmul
peak counts the Linear layers' FLOPs (forward, and twice that backward) against a large matmul on
the same threads.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch

from bnsweep.bench.peak import at_peak, epoch_flops, matmul_peak
from bnsweep.config import compose, instantiate
from bnsweep.population import auto
from bnsweep.population.loop import run_population
from bnsweep.training.run import quiet_lightning, run_training

LR_RANGE = (1e-3, 1.0)


def lr_grid(n: int) -> list[float]:
    lo, hi = (math.log10(v) for v in LR_RANGE)
    return [10 ** (lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]


def run_size(k: int, cfgs: Sequence, dm, round_: int) -> dict[str, float]:
    """One measurement: K=1 one ordinary trial, else one population of K."""
    start = time.perf_counter()
    if k == 1:
        cfg = cfgs[(3 * round_ + 1) % len(cfgs)]
        dm.seed = int(cfg.data.seed)
        results = [run_training(cfg, datamodule=dm, track=False)]
    else:
        results = run_population(cfgs, datamodule=dm, track=False)
    wall = time.perf_counter() - start
    epoch_s = [r["epoch_time_s"] for res in results for r in res.history]
    return {"wall": wall, "per_hour": len(results) / wall * 3600, "epoch_s": statistics.median(epoch_s),
            "val_acc": [res.metrics["best_val_acc"] for res in results],
            "lrs": [float(c.optimizer.lr) for c in cfgs] if k > 1 else [float(cfg.optimizer.lr)]}


def bench(epochs: int, sizes: Sequence[int], rounds: int, gpu: bool,
          limit_train: int | None = None) -> tuple[dict[int, list[dict]], dict]:
    quiet_lightning()
    accel = "gpu" if gpu else "cpu"
    with tempfile.TemporaryDirectory() as store:
        def cfgs(k: int) -> list:
            return [compose("train", [
                "experiment=seed001_bn", f"trainer.max_epochs={epochs}", f"trainer.accelerator={accel}", "threads=1",
                "train.eval_batch_sizes=[]", f"tracking.store_dir={store}", f"optimizer.lr={lr}",
                f"data.limit_train={limit_train or 'null'}"])
                for lr in lr_grid(max(k, 8))]  # K=1 trains the K=8 grid's rates, one per round

        torch.set_num_threads(1)
        first = cfgs(1)[0]
        dm = instantiate(first.data)
        dm.setup("fit")
        # population=auto as a worker runs it: a fresh probe on this machine (not the user's cache)
        old_cache = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = str(store)
        try:
            k_auto, probe = auto.choose(first, dm, auto.candidates_for(torch.device("cuda" if gpu else "cpu")))
        finally:
            os.environ.pop("XDG_CACHE_HOME") if old_cache is None else os.environ.update(XDG_CACHE_HOME=old_cache)
        sizes = sorted({*sizes, k_auto})
        members = {k: cfgs(k) for k in sizes}
        out: dict[int, list[dict]] = {k: [] for k in sizes}
        for r in range(rounds):
            for k in sizes:
                out[k].append(run_size(k, members[k], dm, r))
        device = torch.device("cuda" if gpu else "cpu")
        model = instantiate(first.model, in_shape=dm.in_shape, num_classes=dm.num_classes)
        t = dm.tensors
        flops = epoch_flops(model, len(t["train_x"]), len(t["val_x"]))
        info = {"peak": matmul_peak(device, 1), "epoch_flops": flops, "device": device, "auto": k_auto,
                "probe": probe}
    return out, info


def report(epochs: int = 1, sizes: Sequence[int] | None = None, rounds: int = 2, gpu: bool = False,
           limit_train: int | None = None) -> None:
    gpu = gpu and torch.cuda.is_available()
    sizes = list(sizes or ((1, 8, 32, 128) if gpu else (1, 8, 32)))
    out, info = bench(epochs, sizes, rounds, gpu, limit_train)
    sizes = list(out)
    peak = info["peak"]
    print(f"\n[population] experiment=seed001_bn (MNIST 55k, 784-300-100-10, BN), {epochs} epoch(s) per trial, "
          f"1 thread, {info['device']}; learning rates log-spaced {LR_RANGE[0]:g}..{LR_RANGE[1]:g}; "
          f"{rounds} interleaved rounds; matmul peak {peak / 1e9:.1f} GFLOP/s")
    base = statistics.median(r["per_hour"] for r in out[1]) if 1 in out else None
    for k in sizes:
        rows = out[k]
        per_hour = statistics.median(r["per_hour"] for r in rows)
        epoch_s = statistics.median(r["epoch_s"] for r in rows)
        accs = [a for r in rows for a in r["val_acc"]]
        ratio = f"{per_hour / base:5.2f}x K=1" if base else ""
        print(f"  K={k:<4} {per_hour:8.0f} trials/hour  {ratio}  {epoch_s:6.2f} s/epoch per trial  "
              f"{at_peak(info['epoch_flops'], epoch_s, peak)} per epoch  best val_acc median "
              f"{statistics.median(accs):.4f} (min {min(accs):.4f}, max {max(accs):.4f})  "
              f"(each round: {', '.join(str(round(r['per_hour'])) for r in rows)})")
    if 1 in out and 8 in out:
        pop = dict(zip(out[8][0]["lrs"], out[8][0]["val_acc"], strict=True))
        pairs = [(r["lrs"][0], r["val_acc"][0], pop.get(r["lrs"][0])) for r in out[1]]
        print("  same lr, K=1 vs K=8 member: " + "; ".join(
            f"lr {lr:.3g}: {a:.4f} vs {b:.4f}" for lr, a, b in pairs if b is not None))
    rates = {k: statistics.median(r["per_hour"] for r in out[k]) for k in sizes}
    fixed = max(rates, key=rates.__getitem__)
    probe = info["probe"]
    measured = ", ".join(f"K={k} {r:.0f}/h" for k, r in probe.get("rates", {}).items())
    print(f"  population=auto: K={info['auto']} after a {probe.get('probe_s', 0):.1f} s probe "
          f"({measured} predicted; cached per machine and shape, so paid once)")
    print(f"  ratio auto / best fixed K (K={fixed}) trials/hour {rates[info['auto']] / rates[fixed]:.2f}x "
          "(bar: >= 0.97)")
    if 8 in out and base:
        print(f"  ratio K=8 / K=1 trials/hour {statistics.median(r['per_hour'] for r in out[8]) / base:.2f}x "
              "(machine-dependent: pays where one trial leaves the matmul units idle; auto measures it)")
