"""Bad input ends in one ``error:`` line naming key, value and what is allowed (through the real CLI), and a
changed sweep definition is refused instead of mixing old and new trials (real journal, real driver)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, bnsweep_cli, studies_of

from bnsweep.config import compose
from bnsweep.errors import ConfigError, check_bool, check_int
from bnsweep.sweep.changes import differences
from bnsweep.sweep.definition import parse
from bnsweep.training.checks import validate
from bnsweep.training.data import CACHE_NAME, DataError, acquire


def mirror() -> Path:
    """The real MNIST files (torchvision's layout) of BNSWEEP_DATA_MIRROR."""
    path = Path(os.environ.get("BNSWEEP_DATA_MIRROR", "/nonexistent"))
    if not (path / "MNIST" / "raw").exists():
        pytest.skip(f"no MNIST mirror under {path} (set BNSWEEP_DATA_MIRROR)")
    return path


def one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    """What ``bnsweep`` prints as its one ``error:`` line (``run_app``), checked without starting a process."""
    assert "\n" not in str(error.value) and all(p in str(error.value) for p in parts), str(error.value)


@pytest.mark.parametrize(("arg", "parts"), [
    ("data.batch_size=32.5", ("data.batch_size=32.5", "integer")),
    ("model.bn.input=no", ("model.bn.input='no'", "true or false")),
    ("data.standardize=1", ("data.standardize=1", "true or false")),
    ("model.hidden=[64.5]", ("model.hidden[0]=64.5", "integer")),
])
def test_bad_train_input_is_one_line(arg: str, parts: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as error:
        validate(compose("train", [arg]))
    one_line(error, *parts)


@pytest.mark.parametrize(("arg", "parts"), [
    ("sweep.n_trials=2.5", ("sweep.n_trials=2.5", "integer >= 1")),
    ("sweep.repeats=1.5", ("sweep.repeats=1.5", "integer >= 0")),
    ("sweep.name=../../outside", ("sweep.name='../../outside'", "letters, digits")),  # a path out of the store
])
def test_bad_sweep_input_is_one_line(arg: str, parts: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as error:
        parse(compose("run_sweep", ["sweep=tiny", arg]).sweep)
    one_line(error, *parts)


def test_bad_input_through_the_cli_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """The real commands print those errors as one line, before anything is written (one process each)."""
    result = bnsweep_cli("train", "data.batch_size=32.5", f"tracking.store_dir={tmp_path / 'mlruns'}", cwd=tmp_path)
    assert_one_line_error(result, "data.batch_size=32.5", "integer")
    result = bnsweep_cli("sweep", "sweep=tiny", "sweep.name=../../outside", f"tracking.store_dir={tmp_path / 'mlruns'}",
                         cwd=tmp_path)
    assert_one_line_error(result, "sweep.name='../../outside'", "letters, digits")
    assert not (tmp_path / "mlruns").exists() and not (tmp_path.parent.parent / "outside").exists()


def test_checks_refuse_rather_than_truncate_or_guess() -> None:
    assert check_int("k", 3) == 3 and check_bool("k", False) is False
    for bad in (32.5, 3.0, True, "3"):
        with pytest.raises(ConfigError, match="must be an integer"):
            check_int("k", bad)
    for bad in ("no", "yes", 0, 1, "false", None):
        with pytest.raises(ConfigError, match="true or false"):
            check_bool("k", bad)


def copy_mnist(dest: Path) -> Path:
    raw = dest / "MNIST" / "raw"
    shutil.copytree(mirror() / "MNIST" / "raw", raw)
    return raw


def test_corrupt_gzip_file_is_named_through_the_cli(tmp_path: Path) -> None:
    raw = copy_mnist(tmp_path / "data")
    bad = next(raw.glob("train-images-idx3-ubyte*"))
    assert bad.suffix == ".gz", "the mirror holds gzip files"
    blob = bytearray(bad.read_bytes())
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)  # a damaged deflate stream: zlib.error before
    bad.write_bytes(bytes(blob))
    result = bnsweep_cli("train", f"data.root={tmp_path / 'data'}", "data.sources=[present]",
                         f"tracking.store_dir={tmp_path / 'mlruns'}", cwd=tmp_path)
    assert_one_line_error(result, f"data file {bad} is corrupt (", "delete it to download again")


def test_decoded_cache_is_rechecked_against_its_source_files(tmp_path: Path) -> None:
    raw = copy_mnist(tmp_path)
    first, origin = acquire("mnist", tmp_path, None, ["present"])
    assert origin.startswith("files in")
    assert acquire("mnist", tmp_path, None, ["present"])[1].startswith("cache (")
    # a source file replaced (here: other labels): the cache is stale and decoded again
    labels = raw / "t10k-labels-idx1-ubyte"
    for gz in raw.glob("t10k-labels-idx1-ubyte*"):
        gz.unlink()
    header = b"\x00\x00\x08\x01" + (10000).to_bytes(4, "big")
    labels.write_bytes(header + bytes(10000))  # every test label 0
    again, origin = acquire("mnist", tmp_path, None, ["present"])
    assert origin.startswith("files in") and int(again["test_y"].sum()) == 0 != int(first["test_y"].sum())
    # a damaged cache is decoded again, not a crash
    cache = tmp_path / "MNIST" / CACHE_NAME
    cache.write_bytes(cache.read_bytes()[:1000])
    _, origin = acquire("mnist", tmp_path, None, ["present"])
    assert origin.startswith("files in")
    assert torch.load(cache, weights_only=True)["stamp"]
    labels.write_bytes(header)  # and a truncated source is named
    with pytest.raises(DataError, match="is corrupt .*delete it to download again"):
        acquire("mnist", tmp_path, None, ["present"])


# ------------------------------------------------------------------ changed sweep definitions


SWEEP = """name: t_change
base: [data=mnist, model=mlp, optimizer=sgd, data.limit_train=500, data.val_size=500, "model.hidden=[16]"]
grid:
  model.bn.placement: [none]
search:
  optimizer.lr: {{low: {low}, high: 1.0, log: true}}
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
n_trials: {n_trials}
epochs: 1
repeats: {repeats}
"""


def sweep_file(folder: Path, name: str, low: float = 0.01, n_trials: int = 2, repeats: int = 1) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(SWEEP.format(low=low, n_trials=n_trials, repeats=repeats))
    return f"sweep={path}"


def test_changed_sweep_definition_is_refused_and_growth_accepted(tmp_path: Path, mlflow_server: str) -> None:
    store = tmp_path / "mlruns"
    common = ["action=status", f"tracking.uri={mlflow_server}", f"tracking.store_dir={store}"]
    first = bnsweep_cli("sweep", sweep_file(tmp_path, "a"), *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (study,) = studies_of(store, "t_change")
    assert study.user_attrs["n_trials"] == 2

    changed = bnsweep_cli("sweep", sweep_file(tmp_path, "b", low=0.001), *common, cwd=tmp_path)
    line = assert_one_line_error(changed, "sweep t_change was run with search=", "now search=", "0.001",
                                 "use a new sweep.name")
    assert "0.01" in line

    grown = bnsweep_cli("sweep", sweep_file(tmp_path, "c", n_trials=3, repeats=2), *common, cwd=tmp_path)
    assert grown.returncode == 0, grown.stderr
    assert "n_trials 2 -> 3" in grown.stderr and "repeats 1 -> 2" in grown.stderr
    (study,) = studies_of(store, "t_change")
    assert study.user_attrs["n_trials"] == 3 and study.user_attrs["repeats"] == 2

    shrunk = bnsweep_cli("sweep", sweep_file(tmp_path, "d", n_trials=2, repeats=2), *common, cwd=tmp_path)
    assert_one_line_error(shrunk, "was run with n_trials=3; now n_trials=2")


def test_differences_are_generic_over_stored_keys() -> None:
    stored = {"n_trials": 4, "sampler": {"name": "grid"}, "epochs": 3}
    refused, grown = differences(stored, {"n_trials": 6, "sampler": {"name": "grid"}, "epochs": 3, "basin": {}})
    assert refused == ['n_trials=4; now n_trials=6'] and grown == []  # grid values spread by n_trials
    refused, grown = differences({**stored, "sampler": {"name": "qmc"}},
                                 {"n_trials": 6, "sampler": {"name": "qmc"}, "epochs": 5})
    assert grown == ["n_trials 4 -> 6"] and refused == ["epochs=3; now epochs=5"]
