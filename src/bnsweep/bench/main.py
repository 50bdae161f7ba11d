"""``make bench``: speed ratios measured side by side in one run on this machine.

Training speed: experiment=seed001_bn through the full stack (Hydra config, LightningModule,
in-memory DataModule, MLflow logging) against a bare PyTorch loop over the same in-memory tensors
(same model, batch 32, same per-epoch work: train loss/accuracy and a validation pass).
Sweep: trials/hour of the tiny sweep with 1 and 2 workers, and the orchestration overhead per trial
(sweep wall time minus each trial's own fit and test evaluation, which are printed beside it).
Latency (bench/latency.py): no-BN / BN / BN-folded forward passes at batch 1 and 1024, side by side.
Norms (bench/norm_kinds.py): each model.norm.kind's training step (single and per population member) and
inference latency (folded where it can be) relative to no normalization, MLP and CNN, side by side.
Population (bench/population.py): trials/hour of K = 1 (one trial at a time, the ordinary path), 8, 32
(and 128 on a GPU) trials trained as one stacked network, interleaved, and the fraction of the
machine's matmul peak that training reaches.
Tracking (bench/tracking.py): trials/s one MLflow server sustains against trials/s offered, requests per
trial (today's pattern and the buffered one, side by side), per backend and server worker count; Optuna
claims and completions per second.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bnsweep.bench.peak import at_peak, epoch_flops, matmul_peak
from bnsweep.bench.sweeps import report_sweep
from bnsweep.config import compose, instantiate
from bnsweep.training.data import InMemoryDataModule
from bnsweep.training.run import quiet_lightning, run_training

SECTIONS = ["training", "validation", "sweep", "latency", "norms", "population", "peers", "tracking"]
QUICK_TRAIN = 1000  # --quick: training images per run (a smoke run: the ratios mean little)


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


def bench_training(epochs: int, limit_train: int | None = None) -> dict[str, float]:
    quiet_lightning()
    with tempfile.TemporaryDirectory() as store:
        cfg = compose("train", ["experiment=seed001_bn", f"trainer.max_epochs={epochs}",
                                          "trainer.accelerator=cpu", f"tracking.store_dir={store}",
                                          "tracking.uri=null", f"data.limit_train={limit_train or 'null'}"])
        dm = instantiate(cfg.data)
        dm.setup()
        bare = bare_epochs(dm, cfg, epochs)
        start = time.perf_counter()
        full = run_training(cfg, datamodule=dm)
        full_wall = time.perf_counter() - start
        bare += bare_epochs(dm, cfg, epochs)  # bracket the full stack: drift hits both sides
        model = instantiate(cfg.model, in_shape=dm.in_shape, num_classes=dm.num_classes)
        flops = epoch_flops(model, len(dm.tensors["train_x"]), len(dm.tensors["val_x"]))
    full_epochs = [r["epoch_time_s"] for r in full.history]
    return {"bare": statistics.median(bare), "full": statistics.median(full_epochs),
            "full_wall": full_wall / epochs, "val_acc": full.history[-1]["val_acc"], "flops": flops}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per measured run")
    ap.add_argument("--trials", type=int, default=6, help="trials per cell in the sweep benchmark (2 cells)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating 1- and 2-worker sweep pairs")
    ap.add_argument("--only", choices=SECTIONS, default=None)
    ap.add_argument("--sizes", default=None, help="population sizes, e.g. 1,8,32 (default; 1,8,32,128 on a GPU)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the population sizes")
    ap.add_argument("--pop-epochs", type=int, default=1, help="epochs per trial in the population bench")
    ap.add_argument("--levels", default=None, help="tracking: trials at once, e.g. 1,4,16 (default 1,2,4,...,64)")
    ap.add_argument("--cpu", action="store_true", help="population bench on the CPU even when a GPU is there")
    ap.add_argument("--quick", action="store_true",
                    help=f"a smoke run of every section at minimal sizes ({QUICK_TRAIN} training images; "
                         "the ratios mean little)")
    args = ap.parse_args(argv)
    limit = QUICK_TRAIN if args.quick else None
    if args.quick:
        args.epochs, args.trials, args.repeats, args.rounds, args.pop_epochs = 1, 2, 1, 1, 1
        args.sizes = args.sizes or "1,2"
    gpu = "" if args.cpu or not torch.cuda.is_available() else f", GPU {torch.cuda.get_device_name()}"
    print(f"bnsweep bench - torch {torch.__version__}, {torch.get_num_threads()} threads, CPU{gpu}; "
          f"matmul peak {matmul_peak(torch.device('cpu'), torch.get_num_threads()) / 1e9:.1f} GFLOP/s on "
          f"{torch.get_num_threads()} threads, {matmul_peak(torch.device('cpu'), 1) / 1e9:.1f} on 1")
    if args.only in (None, "training"):
        report_training(args.epochs, limit)
    if args.only in (None, "validation"):  # the cost of checks within the epoch (train.val_every)
        from bnsweep.bench.validation import report as report_validation

        report_validation()
    if args.only in (None, "sweep"):
        report_sweep(args.trials, args.repeats, limit)
    if args.only in (None, "latency"):
        from bnsweep.bench.latency import report as report_latency

        report_latency(0.3 if args.quick else 3.0)
    if args.only in (None, "norms"):
        from bnsweep.bench.norm_kinds import report as report_norms

        report_norms(steps=10 if args.quick else 40, rounds=1 if args.quick else 3, k=2 if args.quick else 8,
                     budget_s=0.1 if args.quick else 1.0, batches=(1, 32) if args.quick else (1, 1024))
    if args.only in (None, "population"):
        from bnsweep.bench.population import report as report_population

        sizes = [int(k) for k in args.sizes.split(",")] if args.sizes else None
        report_population(args.pop_epochs, sizes, args.rounds, gpu=not args.cpu, limit_train=limit)
    if args.only in (None, "peers"):
        from bnsweep.bench.peers import report as report_peers

        report_peers(args.epochs, args.trials, limit_train=limit)
    if args.only in (None, "tracking"):
        from bnsweep.bench.tracking import report as report_tracking

        report_tracking(args.quick, tuple(int(n) for n in args.levels.split(",")) if args.levels else None)


def report_training(epochs: int, limit_train: int | None = None) -> None:
    r = bench_training(epochs, limit_train)
    peak = matmul_peak(torch.device("cpu"), torch.get_num_threads())
    print(f"\n[training] experiment=seed001_bn, MNIST {limit_train or '55k'}, batch 32, median s/epoch of {epochs}"
          " (bare loop: median of two brackets around the full stack)")
    print(f"  bare PyTorch loop, same tensors        {r['bare']:7.2f} s/epoch   {at_peak(r['flops'], r['bare'], peak)}")
    print(f"  full stack (Lightning+Hydra+MLflow)    {r['full']:7.2f} s/epoch   {at_peak(r['flops'], r['full'], peak)}")
    print(f"  full stack incl. setup, test, logging  {r['full_wall']:7.2f} s/epoch")
    print(f"  ratio full / bare                      {r['full'] / r['bare']:7.2f}x   (bar: <= 1.20)")


if __name__ == "__main__":
    main()
