"""One training run = one MLflow run: ``bnsweep train experiment=seed001_bn``.

Logs the flattened config as params, per-epoch metrics at step = epoch (1-based), the final
metrics (test_acc, test_loss, best_val_acc, runtime_s, epochs_to_converge, converged), tags
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
from bnsweep.defaults import CONF_DIR
from bnsweep.errors import redact, run_app
from bnsweep.tracking.runs import EpochLogger, RunTracker, flatten, git_commit, resolve_uri
from bnsweep.tracking.server import check_reachable
from bnsweep.training import bn_eval, checkpoint
from bnsweep.training.checks import validate
from bnsweep.training.classifier import ClassifierModule, TrainingDiverged
from bnsweep.training.convergence import convergence_metrics
from bnsweep.training.data import InMemoryDataModule
from bnsweep.training.diagnostics import Diagnostics
from bnsweep.training.models import model_summary, param_counts

log = logging.getLogger("bnsweep")


@dataclass
class RunResult:
    run_id: str | None
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    outcome: str = "completed"  # completed | pruned (by Optuna) | diverged
    tracker: RunTracker | None = None  # close() it when logging went to the background

    @property
    def diverged(self) -> bool:
        return self.outcome == "diverged"


def quiet_lightning() -> None:
    """Lightning's banners (GPU available, TPU available...) mean nothing to a researcher here."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class EpochPrinter(pl.Callback):
    """One line per epoch on stderr, for runs started by hand."""

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        r = module.history[-1]
        print(f"epoch {r['epoch']}/{trainer.max_epochs}  train_loss {r['train_loss']:.4f}  "
              f"train_acc {r['train_acc']:.4f}  val_loss {r['val_loss']:.4f}  "
              f"val_acc {r['val_acc']:.4f}  {r['epoch_time_s']:.1f} s", file=sys.stderr, flush=True)


def build_datamodule(cfg: DictConfig) -> InMemoryDataModule:
    return instantiate(cfg.data)


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
                tags: dict[str, str] | None = None) -> RunTracker:
    return RunTracker(uri, cfg.tracking.experiment, cfg.tracking.get("run_name"), tags=tags,
                               parent_run_id=parent_run_id, store_dir=cfg.tracking.store_dir, background=background)


def stage_run(tracker: RunTracker, cfg: DictConfig, dm: InMemoryDataModule, model: torch.nn.Module,
              device: torch.device) -> None:
    """Params, provenance tags and parameter counts (sent with the first epoch), config/summary artifacts.

    The caller's own tags (trial, study) went with ``create_run`` already (``new_tracker``).
    """
    tracker.stage(  # sent with the first epoch's metrics: one request fewer
        params=flatten(OmegaConf.to_container(cfg, resolve=True)),
        tags={"git_commit": git_commit(), "mlflow.source.git.commit": git_commit(),
              "data_source": dm.origin, "torch_version": torch.__version__,
              "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)},
        metrics=param_counts(model),
    )
    tracker.log_files({"config.yaml": redact(OmegaConf.to_yaml(cfg, resolve=True)),
                       "model_summary.txt": model_summary(model, dm.in_shape)})


def final_metrics(cfg: DictConfig, history: list[dict[str, float]], outcome: str, runtime: float,
                  counts: dict[str, int]) -> dict[str, float]:
    """What every run logs at its end, whatever its outcome (see convergence.py for the censoring)."""
    final = {**convergence_metrics(history, cfg.train.target_acc, int(cfg.trainer.max_epochs)), "runtime_s": runtime,
             "diverged": float(outcome == "diverged"), **counts}
    if history:
        final["s_per_epoch"] = sum(r["epoch_time_s"] for r in history) / len(history)
    return final


def test_metrics(cfg: DictConfig, model: torch.nn.Module, dm: InMemoryDataModule, test_loss: float,
                 test_acc: float, precise: tuple[float, float] | None = None) -> dict[str, float]:
    """A completed run's test metrics: running averages, then population and small-batch statistics."""
    return {"test_acc": test_acc, "test_loss": test_loss, **inference_metrics(cfg, model, dm, test_acc, precise)}


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


def prepare(cfg: DictConfig, datamodule: InMemoryDataModule | None, track: bool) -> tuple[str, InMemoryDataModule]:
    """Before any training: quiet Lightning, the CPU threads, a reachable MLflow store, the data."""
    quiet_lightning()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    uri = resolve_uri(cfg.tracking.uri, cfg.tracking.store_dir)
    if track:
        check_reachable(uri)
    dm = datamodule or build_datamodule(cfg)
    dm.setup("fit")
    return uri, dm


def run_training(cfg: DictConfig, *, datamodule: InMemoryDataModule | None = None,
                 callbacks: Sequence[pl.Callback] = (), tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, track: bool = True,
                 background_logging: bool = False) -> RunResult:
    """Validate, build, fit, test and log one run. Reuse ``datamodule`` to skip loading data.

    ``background_logging`` sends MLflow requests from a thread (sweep workers): the caller then
    owns ``result.tracker`` and must ``close()`` it.
    """
    validate(cfg)
    diagnostics = Diagnostics.from_config(cfg.train)  # None unless train.diagnostics=true
    uri, dm = prepare(cfg, datamodule, track)

    pl.seed_everything(int(cfg.seed), workers=False, verbose=False)
    model = instantiate(cfg.model, in_shape=dm.in_shape, num_classes=dm.num_classes)
    module = ClassifierModule(model, instantiate(cfg.optimizer), max_loss=cfg.train.max_loss)
    all_callbacks = list(callbacks) + ([diagnostics] if diagnostics else [])
    # The caller's tags (trial, study) go with create_run, so even a run killed in its first
    # epoch can be found and ended (tracking.runs.mark_killed).
    tracker = new_tracker(cfg, uri, parent_run_id, background_logging, tags) if track else None
    if tracker:
        all_callbacks.append(EpochLogger(tracker))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=all_callbacks)
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
            return RunResult(None, {}, module.history, outcome)
        if tracker and diagnostics:
            tracker.log_files({Diagnostics.ARTIFACT: diagnostics.to_csv()})
        final = final_metrics(cfg, module.history, outcome, runtime, counts)
        if outcome == "completed":
            evaluated = time.perf_counter()
            final |= test_metrics(cfg, model, dm, *module.evaluate(dm.test_dataloader()))
            final["eval_time_s"] = time.perf_counter() - evaluated  # the test set in every eval mode
        if tracker:
            close_tracker(tracker, cfg, model, dm, final, outcome, len(module.history))
    except BaseException as e:
        if tracker:
            abort_tracker(tracker, e)
        raise
    if tracker and not background_logging:
        tracker.close()
    return RunResult(tracker.run_id if tracker else None, final, module.history, outcome, tracker)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    result = run_app(lambda c: run_training(c, callbacks=[EpochPrinter()]), cfg)
    m = result.metrics
    test = f"test_acc {m['test_acc']:.4f}  " if "test_acc" in m else "diverged  "
    print(f"{test}best_val_acc {m['best_val_acc']:.4f}  epochs_to_converge "
          f"{m['epochs_to_converge']} (converged={m['converged']})  runtime {m['runtime_s']:.1f} s"
          f"\nMLflow run {result.run_id} in {resolve_uri(cfg.tracking.uri, cfg.tracking.store_dir)}"
          f" - see it with: bnsweep ui", file=sys.stderr)
    return m["best_val_acc"]


if __name__ == "__main__":
    main()
