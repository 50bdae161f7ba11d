"""The sweep section of `bnsweep bench`: the tiny sweep with 1 and 2 workers side by side (the peers reuse it)."""

from __future__ import annotations

import statistics
import tempfile

import torch

from bnsweep.bench.peak import at_peak, epoch_flops, matmul_peak
from bnsweep.config import compose, instantiate

MNIST_TRAIN = 60000  # the tiny sweep's training set before the validation split


def bench_sweep(workers: int, n_trials: int, uri: str, store: str, rep: int = 0, epochs: int = 1,
                limit_train: int | None = None) -> dict[str, float]:
    """The tiny sweep's 2 cells, 1 epoch on the full 55k MNIST, fresh studies, run by ``workers`` processes."""
    from bnsweep.sweep.driver import open_sweep

    cfg = compose("run_sweep", [
        "sweep=tiny", f"sweep.name=bench_w{workers}_r{rep}", f"sweep.n_trials={n_trials}", f"sweep.epochs={epochs}",
        "sweep.repeats=0",  # LR-search trials only: what the trials/hour figures have always meant
        f'overrides=["data.limit_train={limit_train or "null"}"]', f"workers={workers}", f"tracking.uri={uri}",
        f"tracking.store_dir={store}"])
    sweep = open_sweep(cfg)
    sweep.prepare()
    sweep.prepare_data()
    wall = sweep.run_workers(workers, quiet=True)
    t = sweep.timing()
    n = t["trials"]
    return {"trials": n, "wall": wall, "per_hour": n / wall * 3600, "flops": trial_flops(sweep.spec, cfg.overrides),
            "per_hour_steady": n / (t["busy_s"] / workers) * 3600,
            "overhead": (workers * wall - t["fit_s"] - t["eval_s"]) / n, "eval": t["eval_s"] / n,
            "steady": (t["busy_s"] - t["fit_s"] - t["eval_s"]) / n,
            "startup": (workers * wall - t["busy_s"]) / workers}


def trial_flops(spec, overrides) -> float:
    """A sweep trial's matmul FLOPs: its epochs of training and validation, then the test set (first cell's model)."""
    cfg = compose("train", [*spec.cells()[0].overrides, *overrides])
    dm = instantiate(cfg.data)
    n_train = int(cfg.data.limit_train or MNIST_TRAIN - int(cfg.data.val_size))
    model = instantiate(cfg.model, in_shape=dm.in_shape, num_classes=dm.num_classes)
    return spec.epochs * epoch_flops(model, n_train, int(cfg.data.val_size)) + epoch_flops(model, 0, 10000)


def report_sweep(trials: int, repeats: int, limit_train: int | None = None) -> None:
    from bnsweep.sweep.launch_local import start_preloading
    from bnsweep.tracking.server import MlflowServer

    start_preloading()  # as `make sweep` does first thing: worker imports overlap the server's start
    with tempfile.TemporaryDirectory() as store:
        server = MlflowServer(store)
        uri = server.start()
        try:  # alternate 1 and 2 workers: the machine's drift hits both sides
            pairs = [tuple(bench_sweep(w, trials, uri, store, rep, limit_train=limit_train) for w in (1, 2))
                     for rep in range(repeats)]
        finally:
            server.stop()
    print(f"\n[sweep] sweeps/tiny: 2 cells x {trials} trials, 1 epoch on {limit_train or '55k'} MNIST images, "
          "1 thread per worker,"
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
    flops = pairs[0][0]["flops"]
    wall = statistics.median(3600 / one["per_hour"] for one, _ in pairs)
    print(f"  1 worker, whole trial (1 thread)           {wall:7.2f} s/trial   "
          f"{at_peak(flops, wall, matmul_peak(torch.device('cpu'), 1))}")
