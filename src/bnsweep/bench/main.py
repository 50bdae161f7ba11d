"""``make bench``: speed ratios measured side by side in one run on this machine.

Training speed: experiment=seed001_bn through the full stack (Hydra config, LightningModule,
in-memory DataModule, MLflow logging) against a bare PyTorch loop over the same in-memory tensors
(same model, batch 32, same per-epoch work: train loss/accuracy and a validation pass).
Sweep: trials/hour of the tiny sweep with 1 and 2 workers, and the orchestration overhead per trial
(sweep wall time minus each trial's own fit and test evaluation, which are printed beside it).
Latency (bench/latency.py): no-BN / BN / BN-folded forward passes at batch 1 and 1024, side by side.
Population (bench/population.py): trials/hour of K = 1 (one trial at a time, the ordinary path), 8, 32
(and 128 on a GPU) trials trained as one stacked network, interleaved, and the fraction of the
machine's matmul peak that training reaches.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bnsweep.config import compose, instantiate
from bnsweep.training.data import InMemoryDataModule
from bnsweep.training.run import quiet_lightning, run_training


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
    with tempfile.TemporaryDirectory() as store:
        cfg = compose("train", ["experiment=seed001_bn", f"trainer.max_epochs={epochs}",
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


def bench_sweep(workers: int, n_trials: int, uri: str, store: str, rep: int = 0) -> dict[str, float]:
    """The tiny sweep's 2 cells, 1 epoch on the full 55k MNIST, fresh studies, run by ``workers`` processes."""
    from bnsweep.sweep.driver import open_sweep

    cfg = compose("run_sweep", [
        "sweep=tiny", f"sweep.name=bench_w{workers}_r{rep}", f"sweep.n_trials={n_trials}", "sweep.epochs=1",
        "sweep.repeats=0",  # LR-search trials only: what the trials/hour figures have always meant
        'overrides=["data.limit_train=null"]', f"workers={workers}", f"tracking.uri={uri}",
        f"tracking.store_dir={store}"])
    sweep = open_sweep(cfg)
    sweep.prepare()
    sweep.prepare_data()
    wall = sweep.run_workers(workers, quiet=True)
    t = sweep.timing()
    n = t["trials"]
    return {"trials": n, "wall": wall, "per_hour": n / wall * 3600,
            "per_hour_steady": n / (t["busy_s"] / workers) * 3600,
            "overhead": (workers * wall - t["fit_s"] - t["eval_s"]) / n, "eval": t["eval_s"] / n,
            "steady": (t["busy_s"] - t["fit_s"] - t["eval_s"]) / n,
            "startup": (workers * wall - t["busy_s"]) / workers}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per measured run")
    ap.add_argument("--trials", type=int, default=6, help="trials per cell in the sweep benchmark (2 cells)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating 1- and 2-worker sweep pairs")
    ap.add_argument("--only", choices=["training", "sweep", "latency", "population", "validation"], default=None)
    ap.add_argument("--sizes", default=None, help="population sizes, e.g. 1,8,32 (default; 1,8,32,128 on a GPU)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the population sizes")
    ap.add_argument("--pop-epochs", type=int, default=1, help="epochs per trial in the population bench")
    ap.add_argument("--cpu", action="store_true", help="population bench on the CPU even when a GPU is there")
    args = ap.parse_args(argv)
    print(f"bnsweep bench - torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    if args.only in (None, "training"):
        report_training(args.epochs)
    if args.only in (None, "validation"):  # the cost of checks within the epoch (train.val_every)
        from bnsweep.bench.validation import report as report_validation

        report_validation()
    if args.only in (None, "sweep"):
        report_sweep(args.trials, args.repeats)
    if args.only in (None, "latency"):
        from bnsweep.bench.latency import report as report_latency

        report_latency()
    if args.only in (None, "population"):
        from bnsweep.bench.population import report as report_population

        sizes = [int(k) for k in args.sizes.split(",")] if args.sizes else None
        report_population(args.pop_epochs, sizes, args.rounds, gpu=not args.cpu)


def report_sweep(trials: int, repeats: int) -> None:
    from bnsweep.sweep.launch_local import start_preloading
    from bnsweep.tracking.server import MlflowServer

    start_preloading()  # as `make sweep` does first thing: worker imports overlap the server's start
    with tempfile.TemporaryDirectory() as store:
        server = MlflowServer(store)
        uri = server.start()
        try:  # alternate 1 and 2 workers: the machine's drift hits both sides
            pairs = [tuple(bench_sweep(w, trials, uri, store, rep) for w in (1, 2)) for rep in range(repeats)]
        finally:
            server.stop()
    print(f"\n[sweep] sweeps/tiny: 2 cells x {trials} trials, 1 epoch on 55k MNIST images, 1 thread per worker,"
          f" MLflow server, journal storage; {repeats} alternating repeats")
    for one, two in pairs:
        for w, r in ((1, one), (2, two)):
            print(f"  {w} worker{'s' if w > 1 else ' '}  {r['trials']} trials in {r['wall']:6.1f} s   "
                  f"{r['per_hour']:7.0f} trials/hour   test evaluation {r['eval']:.2f} s/trial, "
                  f"orchestration {r['overhead']:.2f} s/trial "
                  f"(start-up {r['startup']:.1f} s per worker; steady state {r['steady']:.2f} s/trial)")
    ratios = [two["per_hour"] / one["per_hour"] for one, two in pairs]
    steady = [two["per_hour_steady"] / one["per_hour_steady"] for one, two in pairs]
    overhead = [one["overhead"] for one, _ in pairs]
    with_eval = [one["overhead"] + one["eval"] for one, _ in pairs]
    print(f"  ratio 2 workers / 1 worker, whole sweep    {statistics.median(ratios):7.2f}x   (bar: >= 1.80; "
          f"each repeat: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"  ratio 2 workers / 1 worker, after start-up {statistics.median(steady):7.2f}x   "
          f"(each repeat: {', '.join(f'{r:.2f}' for r in steady)})")
    print(f"  orchestration overhead, 1 worker           {statistics.median(overhead):7.2f} s/trial incl. "
          f"start-up (bar: <= 0.30; each repeat: {', '.join(f'{o:.2f}' for o in overhead)})")
    print(f"  wall - fit, 1 worker (adds test evaluation) {statistics.median(with_eval):6.2f} s/trial   "
          f"(each repeat: {', '.join(f'{o:.2f}' for o in with_eval)})")


def report_training(epochs: int) -> None:
    r = bench_training(epochs)
    print(f"\n[training] experiment=seed001_bn, MNIST 55k, batch 32, median s/epoch of {epochs}"
          " (bare loop: median of two brackets around the full stack)")
    print(f"  bare PyTorch loop, same tensors        {r['bare']:7.2f} s/epoch")
    print(f"  full stack (Lightning+Hydra+MLflow)    {r['full']:7.2f} s/epoch")
    print(f"  full stack incl. setup, test, logging  {r['full_wall']:7.2f} s/epoch")
    print(f"  ratio full / bare                      {r['full'] / r['bare']:7.2f}x   (bar: <= 1.20)")


if __name__ == "__main__":
    main()
