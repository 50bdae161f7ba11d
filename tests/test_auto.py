"""population=auto: a real probe picks K among the candidates, cached per machine and shape; it trains as promised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_cfg, runs_by_role, tiny_population_sweep

from bnsweep.config import instantiate
from bnsweep.errors import ConfigError
from bnsweep.population import auto
from bnsweep.population.checks import population_value
from bnsweep.population.loop import run_population
from bnsweep.sweep.definition import parse
from bnsweep.training.run import run_training

SMALL = ("data.limit_train=600", "data.val_size=500", "data.eval_batch_size=250", "trainer.max_epochs=2",
         "trainer.accelerator=cpu", "train.eval_batch_sizes=[]", "model.hidden=[32,16]", "threads=1")
CANDIDATES = (1, 2, 4)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return auto.cache_path()


@pytest.fixture(scope="module")
def dm():
    data = instantiate(make_cfg(*SMALL).data)
    data.setup("fit")
    return data


def test_auto_picks_a_candidate_from_a_real_probe_and_reuses_it(cache: Path, dm) -> None:
    cfg = make_cfg(*SMALL, "optimizer=momentum")
    k, record = auto.choose(cfg, dm, CANDIDATES)
    assert not record["cached"]
    assert sorted(int(c) for c in record["steps"]) == list(CANDIDATES)  # every candidate's steps, K=1 included
    assert "1" in record["rates"] and len(record["rates"]) == 2  # K=1 and the shortlisted population as whole trials
    assert all(r > 0 for r in [*record["rates"].values(), *record["steps"].values()])
    assert k == auto.best_k({int(c): r for c, r in record["rates"].items()})
    stored = json.loads(cache.read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["k"] == k
    again, second = auto.choose(cfg, dm, CANDIDATES)
    assert (again, second["cached"], second["rates"]) == (k, True, record["rates"])  # no second probe
    other, third = auto.choose(make_cfg(*SMALL, "optimizer=momentum", "model.hidden=[48]"), dm, CANDIDATES)
    assert not third["cached"] and len(json.loads(cache.read_text())) == 2  # a new shape, probed anew
    assert other == auto.best_k({int(c): r for c, r in third["rates"].items()})
    assert auto.choose(cfg, dm, CANDIDATES, limit=1)[0] == 1


def test_best_k_prefers_one_trial_at_a_time_unless_a_population_clearly_wins() -> None:
    assert auto.best_k({1: 100.0, 8: 105.0}) == 1
    assert auto.best_k({1: 100.0, 8: 150.0, 32: 140.0}) == 8
    assert auto.best_k({1: 100.0, 2: 90.0}) == 1


def test_a_cell_that_cannot_be_a_population_trains_alone(cache: Path, dm) -> None:
    k, record = auto.choose(make_cfg(*SMALL, "train.diagnostics=true"), dm, CANDIDATES)
    assert k == 1 and "train.diagnostics=true" in record["reason"] and not cache.exists()


def test_auto_k_members_equal_their_single_runs(cache: Path, dm) -> None:
    """Whatever K the probe picks, each member ends with its own single run's numbers."""
    cfgs = [make_cfg(*SMALL, f"tracking.store_dir={cache.parent}", f"optimizer.lr={lr}")
            for lr in (0.05, 0.2, 0.1, 0.3)]
    k, _ = auto.choose(cfgs[0], dm, CANDIDATES)
    chosen = cfgs[:k]
    results = run_population(chosen, datamodule=dm, track=False) if k > 1 else [
        run_training(chosen[0], datamodule=dm, track=False)]
    for cfg, member in zip(chosen, results, strict=True):
        dm.seed = int(cfg.data.seed)
        single = run_training(cfg, datamodule=dm, track=False)
        assert member.outcome == single.outcome
        for key in ("best_val_acc", "test_acc", "test_acc_precise"):
            assert member.metrics[key] == pytest.approx(single.metrics[key], abs=1e-4), key


RAW = {"name": "p", "base": ["data.limit_train=100"], "grid": {"model.bn.placement": ["none"]},
       "search": {"optimizer.lr": {"low": 1e-3, "high": 1.0, "log": True}}, "n_trials": 4}


def test_sweeps_and_workers_accept_auto() -> None:
    assert parse({**RAW, "population": "auto"}).population == "auto"
    assert parse({**RAW, "population": "auto", "search": {"optimizer.lr": {"low": 1e-3, "high": 1.0},
                                                          "model.bn.momentum": {"low": 0.01, "high": 0.1}}}
                 ).population == 1  # members could not differ in momentum: auto means one at a time
    # a cell that cannot be a population is no error under auto (the worker trains it alone)
    assert parse({**RAW, "population": "auto", "base": ["data.limit_train=100", "train.diagnostics=true"]})
    assert [population_value(v) for v in ("auto", "8", 3, None)] == ["auto", 8, 3, None]
    with pytest.raises(ConfigError, match="must be an integer >= 1 or auto"):
        population_value("fast", "--population")
    with pytest.raises(ConfigError, match="must be an integer >= 1 or auto"):
        parse({**RAW, "population": "fast"})


def test_auto_population_sweep_completes_every_trial(mlflow_server: str, tmp_path: Path, cache: Path) -> None:
    """The tiny sweep with population=auto: real driver, forked worker, journal storage, MLflow server, real probe."""
    name = "t_auto"
    tiny_population_sweep(mlflow_server, tmp_path, name, "auto")
    probes = json.loads(cache.read_text())  # the worker probed each cell's shape (with and without BN) once
    assert len(probes) == 2 and all(p["k"] == auto.best_k({int(c): r for c, r in p["rates"].items()})
                                    for p in probes.values())  # each cell's K follows from what it measured
    runs = runs_by_role(mlflow_server, name)["trial"]
    assert len(runs) == 10 and all(r.info.status == "FINISHED" for r in runs)
    biggest = max(p["k"] for p in probes.values())
    assert all(int(r.data.tags.get("bnsweep.population", "1")) <= biggest for r in runs)
