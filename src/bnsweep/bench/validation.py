"""``make bench ARGS="--only validation"``: what validating every ``train.val_every`` steps costs, side by side.

The seeds' MNIST BN MLP (experiment=seed001_bn, 55k images, batch 32), the same epochs once with
``train.val_every`` at its default (checks within the epoch plus one at its end) and once with
``train.val_every=null`` (one check per epoch, at its end), interleaved in rounds so the machine's
drift hits both. s/epoch is the median of the runs' ``epoch_time_s``, which includes every check made
within the epoch; no MLflow, so only training and validation are timed.
"""

from __future__ import annotations

import statistics

from bnsweep.config import compose, instantiate
from bnsweep.training.run import quiet_lightning, run_training


def measure(epochs: int, rounds: int) -> dict[str, float]:
    """Median s/epoch with the default val_every and with validation at epoch ends only; checks per epoch."""
    quiet_lightning()
    base = ["experiment=seed001_bn", f"trainer.max_epochs={epochs}", "trainer.accelerator=cpu"]
    every = compose("train", base)
    once = compose("train", [*base, "train.val_every=null"])
    dm = instantiate(every.data)
    dm.setup()
    times: dict[str, list[float]] = {"every": [], "once": []}
    checks = 0
    for _ in range(rounds):
        for name, cfg in (("every", every), ("once", once)):
            result = run_training(cfg, datamodule=dm, track=False)
            times[name] += [r["epoch_time_s"] for r in result.history]
            if name == "every":
                checks = len(result.checks)
    return {"val_every": every.train.val_every, "every": statistics.median(times["every"]),
            "once": statistics.median(times["once"]), "checks_per_epoch": checks / epochs,
            "val_images": len(dm.tensors["val_x"])}


def report(epochs: int = 1, rounds: int = 2) -> None:
    r = measure(epochs, rounds)
    print(f"\n[validation] experiment=seed001_bn, MNIST 55k, batch 32, {r['val_images']} validation images, "
          f"median s/epoch of {rounds} interleaved rounds x {epochs} epoch(s)")
    print(f"  train.val_every={r['val_every']} ({r['checks_per_epoch']:.1f} checks/epoch) "
          f"{r['every']:7.2f} s/epoch")
    print(f"  train.val_every=null (1 check/epoch)     {r['once']:7.2f} s/epoch")
    print(f"  ratio val_every / once per epoch         {r['every'] / r['once']:7.2f}x")
