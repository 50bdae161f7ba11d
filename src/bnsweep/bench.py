"""``make bench``: speed ratios measured side by side in one run on this machine.

Training speed: experiment=seed001_bn through the full stack (Hydra config, LightningModule,
in-memory DataModule, MLflow logging) against a bare PyTorch loop over the same in-memory tensors
(same model, batch 32, same per-epoch work: train loss/accuracy and a validation pass).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from bnsweep.config import instantiate
from bnsweep.data import InMemoryDataModule
from bnsweep.train import CONF_DIR, quiet_lightning, run_training


def bare_epochs(dm: InMemoryDataModule, cfg, epochs: int) -> list[float]:
    """The reference: a plain loop, written as anyone would, over the same device tensors."""
    torch.manual_seed(int(cfg.seed))
    t = dm.tensors
    model = instantiate(cfg.model, in_shape=dm.in_shape, num_classes=dm.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        sums = torch.zeros(3)
        for idx in torch.randperm(len(t["train_x"]), generator=gen).split(cfg.data.batch_size):
            x, y = t["train_x"][idx], t["train_y"][idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum(), torch.tensor(len(y))])
        model.eval()
        with torch.no_grad():
            for x, y in zip(t["val_x"].split(1000), t["val_y"].split(1000), strict=True):
                (model(x).argmax(1) == y).sum().item()
        sums.tolist()
        times.append(time.perf_counter() - start)
    return times


def bench_training(epochs: int) -> dict[str, float]:
    quiet_lightning()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"), \
            tempfile.TemporaryDirectory() as store:
        cfg = compose("train", overrides=["experiment=seed001_bn", f"trainer.max_epochs={epochs}",
                                          "trainer.accelerator=cpu", f"tracking.store_dir={store}",
                                          "tracking.uri=null"])
        dm = instantiate(cfg.data)
        dm.setup()
        bare = bare_epochs(dm, cfg, epochs)
        start = time.perf_counter()
        full = run_training(cfg, datamodule=dm)
        full_wall = time.perf_counter() - start
        bare += bare_epochs(dm, cfg, epochs)  # bracket the full stack: drift hits both sides
    full_epochs = [r["epoch_time_s"] for r in full.history]
    return {"bare": statistics.median(bare), "full": statistics.median(full_epochs),
            "full_wall": full_wall / epochs, "val_acc": full.history[-1]["val_acc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per measured run")
    args = ap.parse_args()
    print(f"bnsweep bench - torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    r = bench_training(args.epochs)
    print(f"\n[training] experiment=seed001_bn, MNIST 55k, batch 32, median s/epoch of {args.epochs}"
          " (bare loop: median of two brackets around the full stack)")
    print(f"  bare PyTorch loop, same tensors        {r['bare']:7.2f} s/epoch")
    print(f"  full stack (Lightning+Hydra+MLflow)    {r['full']:7.2f} s/epoch")
    print(f"  full stack incl. setup, test, logging  {r['full_wall']:7.2f} s/epoch")
    print(f"  ratio full / bare                      {r['full'] / r['bare']:7.2f}x   (bar: <= 1.20)")


if __name__ == "__main__":
    main()
