"""``bnsweep claims``: run the claims sweeps, measure inference latency, then test every claim of the seeds.

The sweeps are conf/sweep/claims_*.yaml (report/registry.py says which settings each one serves). Each runs
through the sweep driver as ``bnsweep sweep`` would, so it is resumable: finished trials are never re-run,
and a second call only re-reads them. Latency (seed 002's inference claims) is measured here, on the
architectures themselves. Every claim is then measured (report/verdicts.py) and written to
``<out_dir>/claims/claims.{md,html,csv}`` and ``claims_summary.csv``; with ``reports=true`` each sweep with a
BN grid also gets its own report (``<out_dir>/<sweep>/``; else ``bnsweep report sweep=<sweep>`` makes it).
Lives above the stages: it drives sweeps and reads their results.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from bnsweep.config import compose
from bnsweep.errors import ConfigError

OWN_KEYS = ("out_dir", "only", "latency_rounds", "reports")  # the command's own; other key=value go to each sweep


def split_args(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    own, rest = {}, []
    for a in args:
        key, eq, value = a.partition("=")
        if not eq:
            raise ConfigError(f"{a}: not a key=value override; bnsweep claims takes the sweep's overrides "
                              "(workers=2, tracking.uri=...) and out_dir=, only=<sweep>[,<sweep>], latency_rounds=, "
                              "reports=true")
        (own.__setitem__(key, value) if key in OWN_KEYS else rest.append(a))
    return own, rest


LATENCY_MODELS = {  # registry.LATENCY_SETTINGS' model names -> (train-config overrides)
    "seed002": ["experiment=seed002_bn"],
    "deep": ["model=mlp", "model.hidden=[100,100,100,100,100,100,100,100]", "model.bn.placement=before_act"],
    "cnn": ["model=cnn", "model.bn.placement=before_act"],
}


def measure_latency(rounds: int) -> dict[tuple[str, str, str], list[float]]:
    """(model, batch, net) -> per-round log(latency / no-BN latency), net in {bn, folded}; and nobn -> 0s.

    Each round times the three networks interleaved (deploy.latency.measure), so a round's ratio is paired.
    """
    import torch
    from omegaconf import OmegaConf

    from bnsweep.deploy.latency import measure, three_models
    from bnsweep.report.registry import LATENCY_SETTINGS
    from bnsweep.training.checkpoint import build_model

    torch.set_num_threads(1)
    out: dict[tuple[str, str, str], list[float]] = {}
    for model_name, batch in LATENCY_SETTINGS.values():
        cfg = compose("train", LATENCY_MODELS[model_name])
        in_shape = (1, 28, 28)
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        torch.manual_seed(0)
        net = build_model(model_cfg, in_shape, 10).eval()
        models = three_models(net, model_cfg, in_shape, 10)
        key = (model_name, str(batch))
        for _ in range(rounds):
            m = measure(models, in_shape, batches=(batch,), repeats=60, budget_s=0.5)
            for name in ("bn", "folded"):
                out.setdefault((*key, name), []).append(math.log(m[f"latency_b{batch}_ratio_{name}_nobn"]))
            out.setdefault((*key, "nobn"), []).append(0.0)
    return out


@cache
def fixed_lrs() -> frozenset[float]:
    """The shared rates of the claims' fixed-LR settings."""
    from bnsweep.report.registry import CLAIMS

    return frozenset(s.lr for c in CLAIMS for s in c.settings if s.lr is not None)


def wanted(cell: Any, trial: Any) -> bool:
    """Whose diagnostics the claims read: repeats, trials at a shared (fixed) LR, every trial of a one-LR cell."""
    return (trial.repeat is not None or any(math.isclose(trial.lr, lr, rel_tol=1e-6) for lr in fixed_lrs())
            or len(cell.trials) <= 1)


def run_claims(args: Sequence[str]) -> Path:
    """Run (or resume) each claims sweep, then measure every claim; returns the Claims report's folder."""
    from bnsweep.report.registry import SWEEPS

    own, overrides = split_args(args)
    names = own["only"].split(",") if "only" in own else list(SWEEPS)
    unknown = [n for n in names if n not in SWEEPS]
    if unknown:  # before the heavy imports: a typo costs a second, not ten
        raise ConfigError(f"only={own['only']}: choose among {', '.join(SWEEPS)}")
    from bnsweep.report.build import collect, make_report
    from bnsweep.report.claims_doc import write
    from bnsweep.report.verdicts import Study, claim_rows
    from bnsweep.sweep.driver import run as run_sweep
    from bnsweep.sweep.storage import default_storage

    rounds = int(own.get("latency_rounds", 6))
    reports = own.get("reports", "false").lower() in ("true", "1", "yes")
    out_dir = Path(own.get("out_dir", "reports"))
    start = time.perf_counter()
    studies = {}
    for name in names:
        cfg = compose("run_sweep", [f"sweep={name}", *overrides])
        t0 = time.perf_counter()
        run_sweep(cfg)
        print(f"claims: sweep {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        url = cfg.storage or default_storage(Path(cfg.tracking.store_dir).resolve(), name)
        _, cells, _, _ = collect(name, url, cfg.tracking, diagnostics_of=wanted)
        studies[name] = Study(cells)
        if reports and any("placement" in c.labels for c in cells):  # a BN grid: its own report reads well
            report_cfg = compose("report", [f"sweep={name}", f"out_dir={out_dir}",
                                            *[o for o in overrides if o.startswith(("tracking.", "storage="))]])
            make_report(report_cfg)
    t0 = time.perf_counter()
    latency = measure_latency(rounds) if rounds > 0 else {}
    print(f"claims: inference latency measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = claim_rows(studies, latency=latency)
    out = out_dir / "claims"
    files = write(out, rows, names, time.perf_counter() - start)
    print(f"claims: {files[0]} (+ claims.html, claims.csv, claims_summary.csv), {len(rows)} rows, in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


def main(args: Sequence[str]) -> None:
    """``bnsweep claims [workers=2] [tracking.uri=...] [out_dir=reports] [only=claims_act] [latency_rounds=6]
    [reports=true]``."""
    from bnsweep.errors import run_app

    run_app(run_claims, list(args))
