"""``bnsweep export run_id=<id>`` (or ``checkpoint=<model.pt>``): a BN-free model for inference.

Folds every BN of a trained model into its neighbouring Linear/Conv (bnsweep.fold), checks on a
random batch that the logits did not move (max |Δ| <= ``tolerance``), and writes ``folded/``:
``state_dict.pt`` (plain weights), ``model.pt2`` (a ``torch.export`` program that runs without
bnsweep; ``model.ts``, TorchScript, only if export fails), ``architecture.txt`` and ``report.json``.
With a run id these are logged to that run, with the check and latency metrics (bnsweep.latency).
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from bnsweep.defaults import CONF_DIR
from bnsweep.deploy.fold import fold_bn
from bnsweep.deploy.latency import NAMES, measure, table, three_models
from bnsweep.errors import BnsweepError, ConfigError, check_bool, check_int, check_range, run_app
from bnsweep.tracking.runs import RunTracker, resolve_uri
from bnsweep.tracking.server import check_reachable
from bnsweep.training import checkpoint

log = logging.getLogger("bnsweep")
RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids (uuid4().hex); anything else never reaches a path or a request


class ExportError(BnsweepError):
    """The model to fold cannot be found, read or folded."""


def program_bytes(model: torch.nn.Module, example: torch.Tensor) -> tuple[str, str, bytes]:
    """(format, file name, bytes): a torch.export program with a dynamic batch size, else TorchScript."""
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        return "torch.export", "model.pt2", buffer.getvalue()
    except Exception as e:  # an op export cannot trace: TorchScript still runs without bnsweep
        log.warning("torch.export failed (%s: %s); writing TorchScript instead", type(e).__name__, e)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.trace(model, example)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        return "torchscript", "model.ts", buffer.getvalue()


def load_program(fmt: str, data: bytes) -> torch.nn.Module:
    """The exported model back as a callable module, as a user without bnsweep would load it."""
    if fmt == "torch.export":
        return torch.export.load(io.BytesIO(data)).module()
    return torch.jit.load(io.BytesIO(data))


def _fetch(cfg: DictConfig, tmp: Path) -> tuple[Path, Any]:
    """The model.pt to fold, and the MLflow client when it came from a run."""
    if (cfg.run_id is None) == (cfg.checkpoint is None):
        got = "both" if cfg.run_id is not None else "neither"
        raise ConfigError(f"give exactly one of run_id=<MLflow run id> or checkpoint=<path to model.pt> "
                          f"(got {got})")
    if cfg.checkpoint is not None:
        path = Path(str(cfg.checkpoint))
        if not path.is_file():
            raise ConfigError(f"checkpoint={cfg.checkpoint}: no such file")
        return path, None
    run_id = str(cfg.run_id)
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"run_id={cfg.run_id!r} is not allowed: an MLflow run id is 32 hexadecimal characters "
                          "(the run page's 'Run ID')")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(cfg.tracking.uri, cfg.tracking.store_dir)
    check_reachable(uri)
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ExportError(f"run_id={run_id}: no such MLflow run in {uri}") from None
    if checkpoint.ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
        raise ExportError(f"run_id={run_id} has no {checkpoint.ARTIFACT} artifact: only runs that completed "
                          "with log_model=true log one")
    return Path(client.download_artifacts(run_id, checkpoint.ARTIFACT, str(tmp))), client


def export(cfg: DictConfig) -> dict[str, Any]:
    """Fold, check, write (and log) the folded model; returns the report (metrics, format, files)."""
    check_int("check_batch", cfg.check_batch, 1)
    check_range("tolerance", cfg.tolerance, 0, low_open=True)
    check_int("seed", cfg.seed, 0)
    check_bool("latency.enabled", cfg.latency.enabled)
    for i, batch in enumerate(cfg.latency.batches):
        check_int(f"latency.batches[{i}]", batch, 1)
    check_int("latency.repeats", cfg.latency.repeats, 1)
    check_int("latency.warmup", cfg.latency.warmup, 0)
    if cfg.latency.get("budget_s") is not None:
        check_range("latency.budget_s", cfg.latency.budget_s, 0, low_open=True)
    if cfg.get("threads") is not None:
        torch.set_num_threads(check_int("threads", cfg.threads, 1))
    with tempfile.TemporaryDirectory() as tmp:
        path, client = _fetch(cfg, Path(tmp))
        try:
            model, meta = checkpoint.load(path)
        except (ValueError, RuntimeError, OSError, KeyError) as e:
            raise ExportError(f"{path}: cannot read the model ({str(e).splitlines()[0]})") from None
    in_shape = tuple(meta["in_shape"])
    folded = fold_bn(model, in_shape)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    x = torch.rand(int(cfg.check_batch), *in_shape, generator=gen)
    fmt, program_name, program = program_bytes(folded, x[:2])
    with torch.inference_mode():
        reference = model(x)
        diff = (folded(x) - reference).abs().max().item()
        program_diff = (load_program(fmt, program)(x) - reference).abs().max().item()
    if not max(diff, program_diff) <= cfg.tolerance:
        raise ExportError(f"folded logits differ from the eval-mode model by max |Δ| = {max(diff, program_diff):.3g}"
                          f" > tolerance={cfg.tolerance}; nothing written")
    metrics = {"fold_max_abs_diff": diff, "fold_program_max_abs_diff": program_diff,
               "fold_bn_layers": float(sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                           for m in model.modules()))}
    if cfg.latency.enabled:
        models = three_models(model, meta["model"], in_shape, meta["num_classes"])
        metrics |= measure(models, in_shape, list(cfg.latency.batches), int(cfg.latency.repeats),
                           int(cfg.latency.warmup), cfg.latency.budget_s, int(cfg.seed))
    report = {"source": str(cfg.run_id or path), "format": fmt, "program": program_name,
              "check_batch": int(cfg.check_batch), "threads": torch.get_num_threads(),
              "layers": [f"{n}: {type(m).__name__}" for n, m in folded.named_children()], "metrics": metrics}
    state = io.BytesIO()
    torch.save(folded.state_dict(), state)
    files: dict[str, str | bytes] = {"folded/state_dict.pt": state.getvalue(), f"folded/{program_name}": program,
                                     "folded/architecture.txt": f"{folded}\n",
                                     "folded/report.json": json.dumps(report, indent=2) + "\n"}
    out_dir = Path(str(cfg.out_dir)) if cfg.out_dir is not None else (
        None if client is not None else Path(path).resolve().parent)
    if out_dir is not None:
        for name, content in files.items():
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        report["out_dir"] = str(out_dir / "folded")
    if client is not None:
        tracker = RunTracker.for_run(client, str(cfg.run_id))
        tracker.log_files(files)
        tracker.log(metrics, tags={"folded_format": fmt})
        tracker.close()
    return report


def describe(report: dict[str, Any], batches: list[int]) -> str:
    m = report["metrics"]
    lines = [f"folded {int(m['fold_bn_layers'])} BN layer(s) of {report['source']}: "
             f"max |Δ logits| {m['fold_max_abs_diff']:.2e} on {report['check_batch']} random inputs, "
             f"{m['fold_program_max_abs_diff']:.2e} for the {report['format']} program",
             "layers: " + ", ".join(report["layers"])]
    if all(f"latency_b{b}_ms_{n}" in m for b in batches for n in NAMES):
        lines.append(table(f"latency, median ms per forward pass ({report['threads']} threads, CPU)", m, batches))
    if "out_dir" in report:
        lines.append(f"wrote {report['out_dir']}/ (state_dict.pt, {report['program']}, architecture.txt, "
                     "report.json)")
    else:
        lines.append(f"logged folded/ (state_dict.pt, {report['program']}, architecture.txt, report.json) and "
                     f"the metrics to run {report['source']}")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report = run_app(export, cfg)
    print(describe(report, list(cfg.latency.batches)), file=sys.stderr)


if __name__ == "__main__":
    main()
