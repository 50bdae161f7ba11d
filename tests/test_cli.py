"""The front door and the packaging: the ``bnsweep`` command, the old ``python -m`` entry points, and a
wheel that runs from outside the checkout (its configs ship inside it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

from bnsweep.cli import COMMANDS

PROMISED = ("train", "sweep", "report", "export", "worker", "ui", "down", "bench")  # what README and docs name
BIN = Path(sys.executable).parent  # the venv's bin/: the console scripts `make setup` installed


def bnsweep(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = BIN / "bnsweep"
    assert exe.exists(), f"no {exe}: the [project.scripts] entry point is missing (make setup installs it)"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command() -> None:
    out = bnsweep("--help")
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^  (\S+) ", out.stdout, re.M))
    assert set(PROMISED) <= listed and set(COMMANDS) <= listed, (listed, out.stdout)
    same = subprocess.run([sys.executable, "-m", "bnsweep", "--help"], capture_output=True, text=True, timeout=120)
    assert same.returncode == 0 and same.stdout == out.stdout  # python -m bnsweep is the same front door


def test_unknown_command_is_one_error_line_naming_it_and_the_choices() -> None:
    out = bnsweep("trian", "model=mlp")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "trian" in lines[0] and all(name in lines[0] for name in PROMISED), lines[0]


HYDRA = r"powered by Hydra.*^model: [^\n]*\bmlp\b"  # the app's help, listing groups composed from conf/
OLD = {"train": HYDRA, "sweep": HYDRA, "report": HYDRA, "export": HYDRA,  # python -m bnsweep.<old>: its --help
       "worker": r"^usage: .*--storage", "server": r"^usage: .*--store-dir", "bench": r"^usage: .*--only"}
# Each old module run as `python -m` runs it (runpy, as __main__), with --help, in one process: torch and
# mlflow are imported once instead of seven times, which keeps this test at seconds rather than a minute.
RUN_EACH = """
import contextlib, io, json, runpy, sys
from hydra.core.global_hydra import GlobalHydra
results = {}
for old in sys.argv[1:]:
    sys.argv, out, code = [f"bnsweep.{old}", "--help"], io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_module(f"bnsweep.{old}", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = repr(e)
    GlobalHydra.instance().clear()
    results[old] = [code, out.getvalue()]
print("RESULTS", json.dumps(results))
"""


def test_every_old_entry_point_still_starts(tmp_path: Path) -> None:
    """Scripts and habits call ``python -m bnsweep.<old>``: each must still run and parse its arguments.

    Run from a folder outside the checkout, so the configs found are the package's own.
    """
    proc = subprocess.run([sys.executable, "-c", RUN_EACH, *OLD], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    results = json.loads(line.removeprefix("RESULTS "))
    failed = {old: (code, output[-1500:]) for old, (code, output) in results.items()
              if code not in (0, None) or not re.search(OLD[old], output, re.M | re.S)}
    assert set(results) == set(OLD) and not failed, failed
    assert not list(tmp_path.iterdir())  # --help writes nothing (no outputs/, no .hydra/)


# ---------------------------------------------------------------------- the wheel, from another folder


def _checkout_copy(dest: Path) -> Path:
    """The files a build reads, copied: setuptools writes build/ and *.egg-info into the tree it builds."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The checkout built into a wheel offline (the venv's setuptools, no index) and installed into a plain folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _checkout_copy(tmp / "checkout")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                            str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("bnsweep-*.whl")
    site = tmp / "site"
    inst = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]
    return wheel, site


def test_wheel_ships_the_configs_and_the_command(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    assert {"bnsweep/conf/train.yaml", "bnsweep/conf/run_sweep.yaml", "bnsweep/conf/sweep/default.yaml",
            "bnsweep/conf/model/mlp.yaml", "bnsweep/cli.py"} <= names
    assert re.search(r"^bnsweep = bnsweep\.cli:main$", scripts, re.M), scripts


def test_installed_wheel_trains_from_outside_the_checkout(installed: tuple[Path, Path], data_root: str,
                                                          tmp_path: Path) -> None:
    """``bnsweep train`` from the installed copy, in a folder with no conf/: the package's own configs compose."""
    _, site = installed
    env = {**os.environ, "PYTHONPATH": str(site)}  # the venv gives the dependencies; the wheel gives bnsweep
    where = subprocess.run([sys.executable, "-c", "import bnsweep, bnsweep.defaults as d; print(bnsweep.__file__);"
                            "print(d.CONF_DIR)"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    module, conf = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(conf).is_relative_to(site), where.stdout  # not the checkout

    store = tmp_path / "mlruns"
    out = subprocess.run([str(site / "bin" / "bnsweep"), "train", "data.limit_train=500", "trainer.max_epochs=1",
                          f"tracking.store_dir={store}", f"data.root={data_root}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (store / "mlflow.db").exists()  # tracked where it was told, not in a mlruns/ of the checkout
    printed = re.search(r"^test_acc ([01]\.\d{4}) .*\nMLflow run ([0-9a-f]{32}) in ", out.stderr, re.M)
    assert printed, out.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{store / 'mlflow.db'}").get_run(printed.group(2))  # the answer is the run's
    assert printed.group(1) == f"{run.data.metrics['test_acc']:.4f}"
