"""One training run = one MLflow run: ``bnsweep train experiment=seed001_bn``.

Logs the flattened config as params (and ``val_every``), every validation check's val_acc, val_loss
and val_epoch (fractional epochs: samples seen / training images) and each epoch's train_loss,
train_acc and epoch_time_s, all at step = optimizer steps so far; the final metrics (test_acc,
test_loss, train_acc_eval and train_loss_eval: eval mode on the first ``train.train_eval_size`` training
images, best_val_acc, runtime_s, epochs_to_converge, steps_to_converge, converged), tags
(git commit, data source, torch version, device) and artifacts (config.yaml, model_summary.txt, and
model.pt: the trained weights, see checkpoint.py). ``main`` is the ``bnsweep train`` command.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from optuna import TrialPruned

from bnsweep.config import instantiate
from bnsweep.defaults import CONF_DIR, FLUSH_S
from bnsweep.errors import redact, run_app
from bnsweep.tracking.runs import RunTracker, flatten, git_commit, resolve_uri
from bnsweep.tracking.server import check_reachable
from bnsweep.training import bn_eval, checkpoint, lr_scaling, trainable
from bnsweep.training.checks import validate
from bnsweep.training.classifier import CheckCallback, ClassifierModule, TrainingDiverged
from bnsweep.training.convergence import Check, convergence_metrics
from bnsweep.training.data import InMemoryDataModule, MinibatchChunks
from bnsweep.training.diagnostics import Diagnostics
from bnsweep.training.models import model_summary, param_counts

log = logging.getLogger("bnsweep")
OFFLINE = "outbox"  # ``track``: MLflow away at the start; the run goes to its outbox alone (outbox.replay)


@dataclass
class RunResult:
    run_id: str | None
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # one row per completed epoch
    outcome: str = "completed"  # completed | pruned (by Optuna) | diverged
    tracker: RunTracker | None = None  # close() it when logging went to the background
    checks: list[dict[str, float]] = field(default_factory=list)  # every validation check (ClassifierModule.checks)

    @property
    def diverged(self) -> bool:
        return self.outcome == "diverged"


def quiet_lightning() -> None:
    """Lightning's banners (GPU available, TPU available...) mean nothing to a researcher here."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class EpochPrinter(CheckCallback):
    """One line per epoch, and one per check within an epoch, on stderr, for runs started by hand."""

    def on_validation_check(self, trainer: pl.Trainer, module: ClassifierModule, check: dict[str, float]) -> None:
        if not module.history or module.history[-1]["step"] != check["step"]:  # the epoch's end prints below
            print(f"  epoch {check['val_epoch']:.2f}  step {int(check['step'])}  val_loss {check['val_loss']:.4f}  "
                  f"val_acc {check['val_acc']:.4f}", file=sys.stderr, flush=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        r = module.history[-1]
        print(f"epoch {r['epoch']}/{trainer.max_epochs}  train_loss {r['train_loss']:.4f}  "
              f"train_acc {r['train_acc']:.4f}  val_loss {r['val_loss']:.4f}  "
              f"val_acc {r['val_acc']:.4f}  {r['epoch_time_s']:.1f} s", file=sys.stderr, flush=True)


class CheckLogger(CheckCallback):
    """Sends each check (val_acc, val_loss, val_epoch) and each epoch's training numbers to MLflow.

    Everything at step = optimizer steps so far, so a learning curve is (val_epoch, val_acc) at any
    ``train.val_every``; an epoch's training row shares the step of its end-of-epoch check.
    """

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker

    def on_validation_check(self, trainer: pl.Trainer, module: ClassifierModule, check: dict[str, float]) -> None:
        self.tracker.log(check_metrics(check), step=int(check["step"]))

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        row = module.history[-1]
        self.tracker.log(epoch_metrics(row), step=int(row["step"]))


def check_metrics(check: dict[str, float]) -> dict[str, float]:
    """What MLflow gets of a validation check (at step = check["step"])."""
    return {"val_acc": check["val_acc"], "val_loss": check["val_loss"], "val_epoch": check["val_epoch"]}


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    """What MLflow gets of an epoch's history row besides its check (at step = row["step"])."""
    return {k: row[k] for k in ("train_loss", "train_acc", "epoch_time_s")}


def epoch_size(dm: InMemoryDataModule) -> tuple[int, int]:
    """Training images, and optimizer steps per epoch (as ``MinibatchChunks`` batches them)."""
    x, y = dm.tensors["train_x"], dm.tensors["train_y"]
    return len(x), MinibatchChunks(x, y, dm.batch_size, 1, False).steps


def build_datamodule(cfg: DictConfig) -> InMemoryDataModule:
    return instantiate(cfg.data)


def build_model(cfg: DictConfig, dm: InMemoryDataModule) -> torch.nn.Module:
    """The run's model, initialized (seed first), with ``train.trainable``'s parameters alone trainable."""
    model = instantiate(cfg.model, in_shape=dm.in_shape, num_classes=dm.num_classes)
    return trainable.apply(model, cfg.train.get("trainable", "all"))


def inference_metrics(cfg: DictConfig, model: torch.nn.Module, dm: InMemoryDataModule, test_acc: float,
                      precise: tuple[float, float] | None = None) -> dict[str, float]:
    """Test metrics with population and small-batch BN statistics (see bn_eval.py).

    ``precise``: (test loss, test accuracy) with population statistics, when measured already.
    """
    t = dm.tensors
    want_precise = cfg.train.get("precise_bn", True)
    out = bn_eval.eval_modes(model, t["train_x"], t["test_x"], t["test_y"],
                               cfg.train.get("eval_batch_sizes") or (), precise=want_precise and precise is None,
                               chunk=dm.eval_batch_size)
    if want_precise and precise is not None:
        out["test_loss_precise"], out["test_acc_precise"] = precise
    if "test_acc_precise" in out:
        out["precise_bn_gain"] = out["test_acc_precise"] - test_acc  # (b) - (a)
    return out


def new_tracker(cfg: DictConfig, uri: str, parent_run_id: str | None, background: bool,
                tags: dict[str, str] | None = None, offline: bool = False) -> RunTracker:
    return RunTracker(uri, cfg.tracking.experiment, cfg.tracking.get("run_name"), tags=tags,
                      parent_run_id=parent_run_id, store_dir=cfg.tracking.store_dir, background=background,
                      flush_s=cfg.tracking.get("flush_s", FLUSH_S), offline=offline)


def stage_run(tracker: RunTracker, cfg: DictConfig, dm: InMemoryDataModule, model: torch.nn.Module,
              device: torch.device) -> None:
    """Params, provenance tags and parameter counts (sent with the first flush), config/summary artifacts.

    The caller's own tags (trial, study) went with ``create_run`` already (``new_tracker``).
    """
    tracker.stage(  # sent with the first flush: one request fewer
        params={**flatten(OmegaConf.to_container(cfg, resolve=True)), "val_every": cfg.train.get("val_every"),
                "lr_effective": lr_scaling.effective_lr(cfg)},  # optimizer.lr after optimizer.lr_scaling
        tags={"git_commit": git_commit(), "mlflow.source.git.commit": git_commit(),
              "data_source": dm.origin, "torch_version": torch.__version__,
              "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)},
        metrics=param_counts(model),
    )
    tracker.log_files({"config.yaml": redact(OmegaConf.to_yaml(cfg, resolve=True)),
                       "model_summary.txt": model_summary(model, dm.in_shape)})


def final_metrics(cfg: DictConfig, history: list[dict[str, float]], checks: list[dict[str, float]],
                  dm: InMemoryDataModule, outcome: str, runtime: float, counts: dict[str, int]) -> dict[str, float]:
    """What every run logs at its end, whatever its outcome (see convergence.py for the censoring)."""
    conv = convergence_metrics([Check(int(c["step"]), int(c["samples"]), c["val_acc"]) for c in checks], history,
                               cfg.train.target_acc, int(cfg.trainer.max_epochs), *epoch_size(dm))
    final = {**conv, "runtime_s": runtime, "diverged": float(outcome == "diverged"), **counts}
    if history:
        final["s_per_epoch"] = sum(r["epoch_time_s"] for r in history) / len(history)
    return final


def train_eval_size(cfg: DictConfig, dm: InMemoryDataModule) -> int:
    """How many training images ``train_acc_eval`` measures: the first ``train.train_eval_size`` (0: none)."""
    return min(int(cfg.train.get("train_eval_size", 5000) or 0), len(dm.tensors["train_x"]))


def train_eval_metrics(cfg: DictConfig, model: torch.nn.Module, dm: InMemoryDataModule,
                       measured: tuple[float, float] | None = None) -> dict[str, float]:
    """Loss and accuracy in eval mode (BN running statistics) on a fixed training subset: the train side of a
    train-test gap without BN's batch noise (``train_acc`` is the epoch's running train-mode accuracy).

    ``measured``: (loss, accuracy) on that subset, when measured already (a population, all members at once).
    """
    n = train_eval_size(cfg, dm)
    if n == 0:
        return {}
    if measured is None:
        t = dm.tensors
        measured = bn_eval.loss_and_accuracy(model, t["train_x"][:n], t["train_y"][:n], dm.eval_batch_size)
    return {"train_loss_eval": measured[0], "train_acc_eval": measured[1]}


def test_metrics(cfg: DictConfig, model: torch.nn.Module, dm: InMemoryDataModule, test_loss: float,
                 test_acc: float, precise: tuple[float, float] | None = None,
                 train_eval: tuple[float, float] | None = None) -> dict[str, float]:
    """A completed run's test metrics: running averages, then population and small-batch statistics; and the
    eval-mode accuracy on a fixed training subset (``train_eval``: measured already)."""
    return {"test_acc": test_acc, "test_loss": test_loss, **inference_metrics(cfg, model, dm, test_acc, precise),
            **train_eval_metrics(cfg, model, dm, train_eval)}


def close_tracker(tracker: RunTracker, cfg: DictConfig, model: torch.nn.Module, dm: InMemoryDataModule,
                  final: dict[str, float], outcome: str, step: int) -> None:
    """Log the final metrics (and a completed run's weights) and end the MLflow run."""
    if outcome == "completed" and cfg.tracking.get("log_model", True):
        tracker.log_files({checkpoint.ARTIFACT: checkpoint.to_bytes(
            model, OmegaConf.to_container(cfg.model, resolve=True), dm.in_shape, dm.num_classes,
            OmegaConf.to_container(cfg, resolve=True))})
    tracker.log(final, step=step, tags={"diverged": str(outcome == "diverged").lower(), "outcome": outcome})
    tracker.finish("FINISHED")


def abort_tracker(tracker: RunTracker, e: BaseException) -> None:
    """A run stopped by an error (FAILED) or from outside (KILLED): say why, end it, wait for it."""
    tracker.log(tags={"error": f"{type(e).__name__}: {e}"[:5000]})
    tracker.finish("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
    tracker.close()


def prepare(cfg: DictConfig, datamodule: InMemoryDataModule | None,
            track: bool | str) -> tuple[str, InMemoryDataModule]:
    """Before any training: quiet Lightning, the CPU threads, a reachable MLflow store, the data."""
    quiet_lightning()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    uri = resolve_uri(cfg.tracking.uri, cfg.tracking.store_dir)
    if track is True:
        check_reachable(uri)
    dm = datamodule or build_datamodule(cfg)
    dm.setup("fit")
    return uri, dm


def run_training(cfg: DictConfig, *, datamodule: InMemoryDataModule | None = None,
                 callbacks: Sequence[pl.Callback] = (), tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, track: bool | str = True,
                 background_logging: bool = False) -> RunResult:
    """Validate, build, fit, test and log one run. Reuse ``datamodule`` to skip loading data.

    ``track``: True (an MLflow run), False (none), ``"outbox"`` (MLflow away: the run goes to the outbox
    alone, with ``background_logging``, for ``outbox.replay`` to send later).

    ``background_logging`` sends MLflow requests from a thread (sweep workers): the caller then
    owns ``result.tracker`` and must ``close()`` it.
    """
    validate(cfg)
    diagnostics = Diagnostics.from_config(cfg.train)  # None unless train.diagnostics=true
    uri, dm = prepare(cfg, datamodule, track)

    pl.seed_everything(int(cfg.seed), workers=False, verbose=False)
    model = build_model(cfg, dm)
    module = ClassifierModule(model, lr_scaling.make_optimizer(cfg), max_loss=cfg.train.max_loss,
                              val_every=cfg.train.get("val_every"), train_size=epoch_size(dm)[0])
    all_callbacks = list(callbacks) + ([diagnostics] if diagnostics else [])
    # The caller's tags (trial, study) go with create_run, so even a run killed in its first
    # epoch can be found and ended (tracking.runs.mark_killed).
    tracker = new_tracker(cfg, uri, parent_run_id, background_logging, tags,
                          offline=track == OFFLINE) if track else None
    if tracker:
        all_callbacks.insert(0, CheckLogger(tracker))  # a check is logged even when a pruner stops the run there
    # model.norm.sync: Lightning swaps every BatchNorm for SyncBatchNorm under DDP (checks.py allows it for kind=batch)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=all_callbacks, sync_batchnorm=model.norm_cfg["sync"])
    device = trainer.strategy.root_device
    model.to(device)
    counts = param_counts(model)
    if tracker:
        stage_run(tracker, cfg, dm, model, device)

    outcome = "completed"
    start = time.perf_counter()
    try:
        try:
            trainer.fit(module, datamodule=dm)
        except TrainingDiverged as e:
            outcome = "diverged"
            log.warning("run diverged: %s", e)
        except TrialPruned:
            outcome = "pruned"
        runtime = time.perf_counter() - start
        if trainer.global_rank > 0:  # DDP: rank 0 alone evaluates and reports
            return RunResult(None, {}, module.history, outcome, checks=module.checks)
        if tracker and diagnostics:
            tracker.log_files({Diagnostics.ARTIFACT: diagnostics.to_csv()})
        final = final_metrics(cfg, module.history, module.checks, dm, outcome, runtime, counts)
        if outcome == "completed":
            evaluated = time.perf_counter()
            final |= test_metrics(cfg, model, dm, *module.evaluate(dm.test_dataloader()))
            final["eval_time_s"] = time.perf_counter() - evaluated  # the test set in every eval mode
        if tracker:
            close_tracker(tracker, cfg, model, dm, final, outcome, module.steps)
    except BaseException as e:
        if tracker:
            abort_tracker(tracker, e)
        raise
    if tracker and not background_logging:
        tracker.close()
    return RunResult(tracker.run_id if tracker else None, final, module.history, outcome, tracker, module.checks)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    result = run_app(lambda c: run_training(c, callbacks=[EpochPrinter()]), cfg)
    m = result.metrics
    test = f"test_acc {m['test_acc']:.4f}  " if "test_acc" in m else "diverged  "
    print(f"{test}best_val_acc {m['best_val_acc']:.4f}  epochs_to_converge {m['epochs_to_converge']:.3f} "
          f"({m['steps_to_converge']} steps, converged={m['converged']})  runtime {m['runtime_s']:.1f} s"
          f"\nMLflow run {result.run_id} in {resolve_uri(cfg.tracking.uri, cfg.tracking.store_dir)}"
          f" - see it with: bnsweep ui", file=sys.stderr)
    return m["best_val_acc"]


if __name__ == "__main__":
    main()
