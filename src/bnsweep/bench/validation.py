"""``make bench ARGS="--only validation"``: what validating every ``train.val_every`` steps costs, side by side.

The seeds' MNIST BN MLP (experiment=seed001_bn, 55k images, batch 32), the same epochs once with
``train.val_every`` at its default (checks within the epoch plus one at its end) and once with
``train.val_every=null`` (one check per epoch, at its end), interleaved in rounds so the machine's
drift hits both. s/epoch is the median of the runs' ``epoch_time_s``, which includes every check made
within the epoch; no MLflow and no test-time BN modes, so a run is little but training and validation.
On a shared machine wall time swings with the neighbours' load, so the process's CPU time per run is
printed beside it (less sensitive to them), and the cost predicted from one validation pass's time.
"""

from __future__ import annotations

import statistics
import time

from bnsweep.config import compose, instantiate
from bnsweep.training import bn_eval
from bnsweep.training.run import quiet_lightning, run_training


def validation_pass_s(cfg, dm) -> float:
    """Seconds of one check: a pass over the validation images in eval mode, as the module runs it."""
    model = instantiate(cfg.model, in_shape=dm.in_shape, num_classes=dm.num_classes)
    t, size = dm.tensors, dm.eval_batch_size
    start = time.perf_counter()
    bn_eval.evaluate(model, zip(t["val_x"].split(size), t["val_y"].split(size), strict=True))
    return time.perf_counter() - start


def measure(epochs: int, rounds: int) -> dict[str, float]:
    """Median s/epoch with the default val_every and with validation at epoch ends only; checks per epoch."""
    quiet_lightning()
    base = ["experiment=seed001_bn", f"trainer.max_epochs={epochs}", "trainer.accelerator=cpu",
            "train.precise_bn=false", "train.eval_batch_sizes=[]"]
    every = compose("train", base)
    once = compose("train", [*base, "train.val_every=null"])
    dm = instantiate(every.data)
    dm.setup()
    times: dict[str, list[float]] = {"every": [], "once": [], "pass": [], "every_cpu": [], "once_cpu": []}
    checks = 0
    for _ in range(rounds):
        for name, cfg in (("every", every), ("once", once)):
            cpu = time.process_time()
            result = run_training(cfg, datamodule=dm, track=False)
            times[f"{name}_cpu"].append(time.process_time() - cpu)
            times[name] += [r["epoch_time_s"] for r in result.history]
            if name == "every":
                checks = len(result.checks)
            times["pass"].append(validation_pass_s(cfg, dm))
    return {"val_every": every.train.val_every, "every": statistics.median(times["every"]),
            "once": statistics.median(times["once"]), "pass": statistics.median(times["pass"]),
            "cpu": statistics.median(times["every_cpu"]) / statistics.median(times["once_cpu"]),
            "checks_per_epoch": checks / epochs, "val_images": len(dm.tensors["val_x"])}


def report(epochs: int = 1, rounds: int = 3) -> None:
    r = measure(epochs, rounds)
    print(f"\n[validation] experiment=seed001_bn, MNIST 55k, batch 32, {r['val_images']} validation images, "
          f"median s/epoch of {rounds} interleaved rounds x {epochs} epoch(s)")
    every = f"train.val_every={r['val_every']} ({r['checks_per_epoch']:.1f} checks/epoch)"
    print(f"  {every:<42}{r['every']:7.2f} s/epoch")
    print(f"  {'train.val_every=null (1 check/epoch)':<42}{r['once']:7.2f} s/epoch")
    print(f"  {'ratio val_every / once per epoch':<42}{r['every'] / r['once']:7.2f}x")
    print(f"  {'ratio of CPU time per run':<42}{r['cpu']:7.2f}x")
    extra = (r["checks_per_epoch"] - 1) * r["pass"] / r["once"]  # the same cost from one pass's time
    print(f"  {'one validation pass':<42}{r['pass']:7.3f} s   (extra checks x pass / epoch: +{extra:.1%})")
