"""``make bench`` section ``peers``: bnsweep against what a researcher would run without it, side by side.

Same model, data split (the first 5,000 training images validate, the next ones train), batch size,
optimizer and epochs on both sides, in the same process run:

- one trial: ``bnsweep``'s full stack (``run_training``, incl. set-up, test and MLflow logging) against
  the canonical Lightning loop, written as lightning-hydra-template trains: torchvision's ``MNIST``
  with ``ToTensor`` through ``torch.utils.data.DataLoader``, a ``LightningModule`` that ``self.log``s
  loss and accuracy each step, ``Trainer.fit`` then ``Trainer.test``;
- an LR study of the same size: ``bnsweep``'s sweep (the tiny sweep's cells, forked workers, journal
  storage, MLflow server) against Optuna's ``study.optimize(objective, n_trials, n_jobs=workers)``
  over that canonical loop, each trial logged with MLflow's fluent API to the same server.

Peers run with torch's default threads, as a user's script would; bnsweep's workers with 1 each.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from bnsweep.config import compose, instantiate
from bnsweep.training.lr_scaling import optimizer_options
from bnsweep.training.run import quiet_lightning, run_training

LR_RANGE = (1e-2, 1.0)  # the tiny sweep's search range


class CanonicalModule(pl.LightningModule):
    """The LightningModule as the template writes it: logging through ``self.log`` every step."""

    def __init__(self, model: torch.nn.Module, make_optimizer) -> None:
        super().__init__()
        self.model, self.make_optimizer = model, make_optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


def torchvision_root(cfg: DictConfig) -> str | None:
    """A folder holding MNIST in torchvision's layout (<root>/MNIST/raw): the data root or the mirror."""
    for root in (cfg.data.root, cfg.data.get("mirror"), os.environ.get("BNSWEEP_DATA_MIRROR")):
        if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return str(root)
    return None


def loaders(cfg: DictConfig, root: str) -> tuple:
    """torchvision datasets and DataLoaders over bnsweep's split: val = the first val_size, train = the next."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    tf = transforms.ToTensor()  # x / 255, as bnsweep's data (standardize: false)
    train = datasets.MNIST(root, train=True, transform=tf, download=False)
    test = datasets.MNIST(root, train=False, transform=tf, download=False)
    val_n = int(cfg.data.val_size)
    end = len(train) if cfg.data.limit_train is None else val_n + int(cfg.data.limit_train)
    b, eb = int(cfg.data.batch_size), int(cfg.data.eval_batch_size)
    return (DataLoader(Subset(train, range(val_n, end)), batch_size=b, shuffle=True),
            DataLoader(Subset(train, range(val_n)), batch_size=eb),
            DataLoader(test, batch_size=eb))


class MlflowEpochs(pl.Callback):
    """Per-epoch metrics to the active MLflow run, with the fluent API (as a user's callback would)."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        import mlflow

        if not trainer.sanity_checking:
            mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items()},
                               step=trainer.current_epoch)


def canonical_trial(cfg: DictConfig, root: str, lr: float | None = None, callbacks: list | None = None) -> float:
    """One trial the canonical way; returns the last validation accuracy."""
    pl.seed_everything(int(cfg.seed), verbose=False)
    train, val, test = loaders(cfg, root)
    model = instantiate(cfg.model, in_shape=(1, 28, 28), num_classes=10)
    make_opt = instantiate({**optimizer_options(cfg), **({"lr": lr} if lr is not None else {})})
    module = CanonicalModule(model, make_opt)
    trainer = pl.Trainer(max_epochs=int(cfg.trainer.max_epochs), accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks or [])
    trainer.fit(module, train, val)
    acc = float(trainer.callback_metrics.get("val/acc", float("nan")))
    trainer.test(module, test, verbose=False)
    return acc


def one_trial(epochs: int, limit_train: int | None, root_override: str | None = None) -> dict[str, float] | str:
    """Seconds per trial: bnsweep's full stack vs the canonical Lightning loop (median of two brackets)."""
    quiet_lightning()
    with tempfile.TemporaryDirectory() as store:
        cfg = compose("train", ["experiment=seed001_bn", f"trainer.max_epochs={epochs}", "trainer.accelerator=cpu",
                                f"tracking.store_dir={store}", "tracking.uri=null",
                                "train.eval_batch_sizes=[]",  # as a sweep trial; precise BN stays (the peer has none)
                                f"data.limit_train={limit_train if limit_train else 'null'}"])
        root = root_override or torchvision_root(cfg)
        if root is None:
            return "no MNIST in torchvision's layout under data.root or BNSWEEP_DATA_MIRROR"
        peer = []
        for _ in range(2):  # peer, ours, peer: drift hits both sides
            start = time.perf_counter()
            canonical_trial(cfg, root)
            peer.append(time.perf_counter() - start)
            if len(peer) == 1:
                start = time.perf_counter()
                result = run_training(cfg)
                ours = time.perf_counter() - start
    return {"ours": ours, "peer": statistics.median(peer), "epochs": epochs, "root": root,
            "epoch_s": statistics.median(r["epoch_time_s"] for r in result.history)}


def optuna_study(cells: list[DictConfig], n_trials: int, workers: int, uri: str, root: str, tag: str) -> float:
    """The peer study: per cell, ``study.optimize`` over the canonical loop, MLflow fluent logging; wall seconds."""
    import mlflow
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(f"peer-optuna-{tag}")
    start = time.perf_counter()
    for i, cfg in enumerate(cells):
        def objective(trial: optuna.Trial, cfg: DictConfig = cfg, i: int = i) -> float:
            lr = trial.suggest_float("lr", *LR_RANGE, log=True)
            with mlflow.start_run(run_name=f"cell {i} trial {trial.number}"):
                mlflow.log_params({"lr": lr, "cell": i})
                acc = canonical_trial(cfg, root, lr, callbacks=[MlflowEpochs()])
                mlflow.log_metric("best_val_acc", acc)
            return acc

        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(objective, n_trials=n_trials, n_jobs=workers)
    return time.perf_counter() - start


def study(n_trials: int, workers: int, epochs: int, limit_train: int | None) -> dict[str, float] | str:
    """Trials/hour of the tiny sweep's cells: bnsweep's sweep vs Optuna's study.optimize (same size, same server)."""
    from bnsweep.bench.sweeps import bench_sweep
    from bnsweep.sweep.definition import parse
    from bnsweep.sweep.launch_local import start_preloading
    from bnsweep.tracking.server import MlflowServer

    quiet_lightning()
    start_preloading()
    limit = f"data.limit_train={limit_train if limit_train else 'null'}"
    sweep_cfg = compose("run_sweep", ["sweep=tiny"])
    spec = parse(OmegaConf.to_container(sweep_cfg.sweep, resolve=True))
    with tempfile.TemporaryDirectory() as store:
        cells = [compose("train", [*c.overrides, f"trainer.max_epochs={epochs}", limit, "trainer.accelerator=cpu"])
                 for c in spec.cells()]
        root = torchvision_root(cells[0])
        if root is None:
            return "no MNIST in torchvision's layout under data.root or BNSWEEP_DATA_MIRROR"
        server = MlflowServer(store)
        uri = server.start()
        try:
            ours = bench_sweep(workers, n_trials, uri, store, rep=100, epochs=epochs, limit_train=limit_train)
            peer_wall = optuna_study(cells, n_trials, workers, uri, root, "r0")
        finally:
            server.stop()
    n = n_trials * len(cells)
    return {"ours": ours["per_hour"], "peer": n / peer_wall * 3600, "trials": n, "cells": len(cells)}


def keras(epochs: int, limit_train: int | None, root: str | None) -> dict[str, float] | str:
    """The seeds' Keras code under ``$BNSWEEP_KERAS_PYTHON`` (``make bench-peers`` sets it up), or why not."""
    import subprocess

    python = os.environ.get("BNSWEEP_KERAS_PYTHON")
    if not python:
        return os.environ.get("BNSWEEP_KERAS_SKIP") or "run `make bench-peers` to set up TensorFlow in its own venv"
    if root is None:
        return "no MNIST in torchvision's layout under data.root or BNSWEEP_DATA_MIRROR"
    cmd = [python, str(Path(__file__).with_name("keras_peer.py")), "--root", root, "--epochs", str(epochs),
           *(["--limit-train", str(limit_train)] if limit_train else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("keras_s_per_epoch=")), None)
    if out.returncode or line is None:
        return f"the Keras run failed (exit {out.returncode}): {(out.stderr.strip().splitlines() or [''])[-1][:200]}"
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split())}


def report(epochs: int, n_trials: int, workers: int = 2, limit_train: int | None = None) -> None:
    limit = f"{limit_train} training images" if limit_train else "55k training images"
    print(f"\n[peers] what a user would run instead: same model, split, batch, optimizer, epochs; MNIST {limit}")
    one = one_trial(epochs, limit_train)
    if isinstance(one, str):
        print(f"  one trial: skipped ({one})")
    else:
        print(f"  canonical Lightning + torchvision DataLoader  {3600 / one['peer']:8.0f} trials/hour   "
              f"({one['peer']:.1f} s per {epochs}-epoch trial incl. test)")
        print(f"  bnsweep full stack (run_training)             {3600 / one['ours']:8.0f} trials/hour   "
              f"({one['ours']:.1f} s incl. set-up, test, precise BN, MLflow)")
        print(f"  ratio bnsweep / canonical Lightning           {one['peer'] / one['ours']:8.2f}x")
        k = keras(epochs, limit_train, one["root"])
        if isinstance(k, str):
            print(f"  seeds' Keras code: skipped ({k})")
        else:
            print(f"  seeds' Keras code (seed 001, BN)              {k['keras_s_per_epoch']:8.2f} s/epoch vs bnsweep "
                  f"{one['epoch_s']:.2f}: ratio {k['keras_s_per_epoch'] / one['epoch_s']:.2f}x "
                  f"(val_acc {k['val_acc']:.4f})")
    s = study(n_trials, workers, 1, limit_train)
    if isinstance(s, str):
        print(f"  LR study: skipped ({s})")
        return
    print(f"  LR study, {s['cells']} cells x {n_trials} trials, 1 epoch, {workers} workers / n_jobs, MLflow server:")
    print(f"  Optuna study.optimize(n_jobs={workers}) + MLflow fluent  {s['peer']:8.0f} trials/hour")
    print(f"  bnsweep sweep ({workers} workers)                       {s['ours']:8.0f} trials/hour")
    print(f"  ratio bnsweep / Optuna+Lightning+MLflow            {s['ours'] / s['peer']:8.2f}x")
