"""The package's layout is its architecture: each stage imports only the stages below it.

Read from the code (ast), so a new import that points up, or a circle, fails here before it hides the
architecture (``docs/architecture.md`` draws the same layers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import bnsweep

PKG = Path(bnsweep.__file__).parent
FOUNDATION = {"errors", "defaults", "config", "stats"}
# stage -> the stages it may import (besides itself); cli, bench, claims (``bnsweep claims``: runs sweeps, then
# reads them as the report does) and the old-name shims sit on top
BELOW: dict[str, set[str]] = {
    "errors": set(), "defaults": set(), "stats": set(), "config": {"errors", "defaults"},
    "tracking": FOUNDATION,
    "training": FOUNDATION | {"tracking"},
    "population": FOUNDATION | {"tracking", "training"},
    "sweep": FOUNDATION | {"tracking", "training", "population"},
    "report": FOUNDATION | {"tracking", "training", "sweep"},
    "deploy": FOUNDATION | {"tracking", "training"},
}
# the driver and its concerns (sweep/state.py joins them), the worker and its concerns, the launchers
RUNNERS = {f"bnsweep.sweep.{m}" for m in (
    "driver", "state", "cells", "recovery", "launch", "progress", "summary", "usage",
    "worker", "claiming", "trials", "running", "outcomes", "ddp", "launch_local", "launch_slurm")}
# module names used twice (each a stage's own word, kept before this check existed); no new ones
SHARED_NAMES = {"__init__", "__main__", "checks", "export", "latency", "server", "worker"}


def imports() -> dict[str, set[str]]:
    """Module name -> the bnsweep modules it imports (at any depth of the file, lazy imports included)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        out[name] = {m for m in found if m.startswith("bnsweep.")}
    return out


def stage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_stage_imports_only_the_stages_below_it() -> None:
    wrong = [f"{m} imports {t}" for m, targets in imports().items() if stage(m) in BELOW
             for t in targets if stage(t) != stage(m) and stage(t) not in BELOW[stage(m)]]
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_the_report_reads_results_without_the_sweep_runners() -> None:
    """The report reads the storage and MLflow itself: it never starts a driver, a worker or a launcher."""
    wrong = [f"{m} imports {t}" for m, targets in imports().items() if stage(m) == "report"
             for t in targets if any(t == r or t.startswith(f"{r}.") for r in RUNNERS)]
    assert not wrong, "\n".join(wrong)


def test_nothing_below_imports_the_top() -> None:
    """cli, bench and claims may import every stage; no stage may import them."""
    top = ("bnsweep.cli", "bnsweep.bench", "bnsweep.claims")
    wrong = [f"{m} imports {t}" for m, targets in imports().items() if stage(m) in BELOW
             for t in targets if t.startswith(top)]
    assert not wrong, "\n".join(wrong)


def test_configs_ship_inside_the_package() -> None:
    assert (PKG / "conf" / "train.yaml").is_file() and (PKG / "conf" / "sweep" / "default.yaml").is_file()


def test_one_module_per_name() -> None:
    """A module name means one thing across the package (``git grep``, tracebacks and docs stay unambiguous)."""
    seen: dict[str, list[str]] = {}
    for path in PKG.rglob("*.py"):
        seen.setdefault(path.stem, []).append(str(path.relative_to(PKG)))
    twice = {name: paths for name, paths in seen.items() if len(paths) > 1 and name not in SHARED_NAMES}
    assert not twice, twice
    assert all((PKG / "sweep" / f"{m.rsplit('.', 1)[1]}.py").is_file() for m in RUNNERS)
