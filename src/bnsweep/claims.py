"""``bnsweep claims``: run the small sweeps that test the seeds' claims, then write the Claims report.

The sweeps are conf/sweep/claims_*.yaml (``report.claims.CLAIMS`` says which claim each one tests). Each
runs through the sweep driver as ``bnsweep sweep`` would, so it is resumable: trials already finished are
never re-run, and a second call only re-reads them. Then every claim is measured from the Optuna storage
and MLflow (report.claims) and written to ``<out_dir>/claims/claims.{md,html,csv}``; each sweep also
gets its own full report (``<out_dir>/<sweep>/``). Lives above the stages: it drives the sweep and reads
the results, which no stage may do both of.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bnsweep.config import compose
from bnsweep.errors import ConfigError

SWEEPS = ("claims_bn", "claims_init", "claims_optimizers")
OWN_KEYS = ("out_dir", "only")  # the claims command's own keys; every other key=value goes to each sweep


def split_args(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    own, rest = {}, []
    for a in args:
        key, eq, value = a.partition("=")
        if not eq:
            raise ConfigError(f"{a}: not a key=value override; bnsweep claims takes the sweep's overrides "
                              f"(workers=2, tracking.uri=...) and out_dir=, only=<sweep>[,<sweep>]")
        (own.__setitem__(key, value) if key in OWN_KEYS else rest.append(a))
    return own, rest


def run_claims(args: Sequence[str]) -> Path:
    """Run (or resume) each claims sweep, then measure every claim; returns the Claims report's folder."""
    from bnsweep.report.build import collect, make_report
    from bnsweep.report.claims import CLAIM_COLUMNS, Study, claim_rows, section
    from bnsweep.report.export import write_csv
    from bnsweep.report.render import Document
    from bnsweep.report.results import Layout
    from bnsweep.sweep.driver import run as run_sweep
    from bnsweep.sweep.storage import default_storage

    own, overrides = split_args(args)
    names = own["only"].split(",") if "only" in own else list(SWEEPS)
    unknown = [n for n in names if n not in SWEEPS]
    if unknown:
        raise ConfigError(f"only={own['only']}: choose among {', '.join(SWEEPS)}")
    out_dir = Path(own.get("out_dir", "reports"))
    start = time.perf_counter()
    studies = {}
    for name in names:
        cfg = compose("run_sweep", [f"sweep={name}", *overrides])
        t0 = time.perf_counter()
        run_sweep(cfg)
        print(f"claims: sweep {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        url = cfg.storage or default_storage(Path(cfg.tracking.store_dir).resolve(), name)
        attrs, cells, _, _ = collect(name, url, cfg.tracking)
        studies[name] = Study(cells, Layout.of(cells, list(attrs.get("grid") or {})))
        report_cfg = compose("report", [f"sweep={name}", f"out_dir={out_dir}",
                                        *[o for o in overrides if o.startswith(("tracking.", "storage="))]])
        make_report(report_cfg)
    rows = claim_rows(studies)
    out = out_dir / "claims"
    out.mkdir(parents=True, exist_ok=True)
    doc = Document("The seeds' claims, tested")
    doc.para(f"Sweeps: {', '.join(f'`{n}`' for n in names)} (conf/sweep/claims_*.yaml); each has its full "
             f"report in {out_dir}/<sweep>/. Re-running `bnsweep claims` re-uses every finished trial.")
    section(doc, rows)
    (out / "claims.md").write_text(doc.to_markdown())
    (out / "claims.html").write_text(doc.to_html())
    write_csv(out / "claims.csv", CLAIM_COLUMNS, rows)
    print(f"claims: {out / 'claims.md'} (+ claims.html, claims.csv), {len(rows)} rows, in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


def main(args: Sequence[str]) -> None:
    """``bnsweep claims [workers=2] [tracking.uri=...] [out_dir=reports] [only=claims_bn]``."""
    from bnsweep.errors import run_app

    run_app(run_claims, list(args))
