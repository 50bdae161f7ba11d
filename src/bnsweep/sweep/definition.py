"""Sweep definitions (``sweeps/*.yaml``): a grid of design factors, an Optuna search inside each cell.

A cell is one combination of grid values; its training config is the train config composed
with ``base`` + ``overrides`` + the cell's values. Everything a worker needs to run a cell is
derived here and stored with the cell's Optuna study, so workers need only the storage URL.
"""

from __future__ import annotations

import difflib
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from bnsweep.config import compose
from bnsweep.errors import ConfigError, check_bool, check_choice, check_int, check_name, check_range
from bnsweep.population.checks import AUTO
from bnsweep.population.checks import check as population_check
from bnsweep.sweep.basin import LR_KEY
from bnsweep.sweep.search import BasinSearch, parse_basin
from bnsweep.training.checks import validate

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
GROUPS = ("data", "model", "optimizer", "trainer", "tracking", "experiment")
SAMPLERS = ("tpe", "random", "grid", "qmc")
PRUNERS = ("none", "median", "hyperband")
SPEC_KEYS = {"name", "description", "base", "grid", "search", "sampler", "pruner", "n_trials", "epochs",
             "target_acc", "repeats", "population", "basin"}


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, Mapping):
        return [prefix.rstrip(".")]
    keys = [prefix.rstrip(".")] if prefix else []
    for k, v in node.items():
        keys += _flat_keys(v, f"{prefix}{k}.")
    return keys


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def label(value: Any) -> str:
    """A grid value's name in cell names; a mapping value may carry its own ``_name``."""
    if isinstance(value, Mapping):
        return str(value.get("_name") or "+".join(f"{k}:{_fmt(v)}" for k, v in value.items()))
    return _fmt(value)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Grid key -> its name in cell names: the last part (``model.bn.placement`` -> ``placement``), or the
    whole key for every key when two last parts are the same."""
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    return short if len(set(short.values())) == len(keys) else {k: k for k in keys}


def cell_labels(values: Mapping[str, Any]) -> dict[str, str]:
    """A cell's grid values (key -> value) as its name spells them: short key -> value label, in grid order."""
    short = short_keys(list(values))
    return {short[k]: label(v) for k, v in values.items()}


def _overrides(key: str, value: Any) -> list[str]:
    """``model.bn: {placement: none, input: true}`` sets several keys at once."""
    if isinstance(value, Mapping):
        return [f"{key}.{k}={_fmt(v)}" for k, v in value.items() if k != "_name"]
    return [f"{key}={_fmt(value)}"]


@dataclass(frozen=True)
class Param:
    """One searched key and its Optuna distribution."""

    key: str
    dist: optuna.distributions.BaseDistribution

    def suggest(self, trial: optuna.Trial) -> Any:
        d = self.dist
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return trial.suggest_categorical(self.key, d.choices)
        if isinstance(d, optuna.distributions.IntDistribution):
            return trial.suggest_int(self.key, d.low, d.high, step=d.step, log=d.log)
        return trial.suggest_float(self.key, d.low, d.high, step=d.step, log=d.log)

    def grid_values(self, n: int) -> list[Any]:
        """``n`` evenly spread values (log-spaced where ``log``) for ``sampler: grid``."""
        d = self.dist
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return [d.choices[i % len(d.choices)] for i in range(n)]
        lo, hi = (math.log10(d.low), math.log10(d.high)) if d.log else (d.low, d.high)
        vals = [lo + (hi - lo) * i / max(n - 1, 1) for i in range(n)]
        vals = [10**v if d.log else v for v in vals]
        return [int(round(v)) for v in vals] if isinstance(d, optuna.distributions.IntDistribution) else vals


@dataclass
class Cell:
    name: str  # e.g. "placement=none,activation=relu"
    values: dict[str, Any]  # grid key -> value
    overrides: list[str]  # full train-config overrides for this cell


@dataclass
class SweepSpec:
    name: str
    grid: dict[str, list[Any]]
    params: list[Param]
    base: list[str] = field(default_factory=list)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    n_trials: int = 8
    epochs: int = 3
    target_acc: float = 0.9
    description: str = ""
    repeats: int = 0  # extra seeds at the cell's best LR, once its LR search is done (slots n_trials..)
    population: int | str = 1  # trials of a cell trained together (population/loop.py); "auto": measured (auto.py)
    basin: BasinSearch | None = None  # the bracketing LR search (sweep/search.py) instead of the sampler

    # ------------------------------------------------------------------ cells

    def cells(self) -> list[Cell]:
        keys = list(self.grid)
        cells = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            name = ",".join(f"{k}={v}" for k, v in cell_labels(values).items()) or "all"
            # Trials test with running averages and population statistics (precise BN); the small-batch
            # evaluations are for single runs unless the sweep's base asks for them.
            overrides = ["train.eval_batch_sizes=[]", *self.base, f"trainer.max_epochs={self.epochs}",
                         f"train.target_acc={self.target_acc}"]
            for k, v in values.items():
                overrides += _overrides(k, v)
            cells.append(Cell(name, values, overrides))
        return cells

    def study_name(self, cell: Cell) -> str:
        return f"{self.name}/{cell.name}"

    # ------------------------------------------------------------------ optuna objects

    def make_sampler(self, worker_seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        name, seed = self.sampler["name"], self.sampler.get("seed")
        kw = {k: v for k, v in self.sampler.items() if k not in ("name", "seed")}
        seed = None if seed is None else int(seed) + worker_seed_offset
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **kw)
        if name == "qmc":  # indexed by trial number: the same points whatever the worker count
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.QMCSampler(seed=self.sampler.get("seed"), scramble=True, **kw)
        return optuna.samplers.RandomSampler(seed=seed)  # random; grid values are enqueued fixed

    def make_pruner(self) -> optuna.pruners.BasePruner:
        name = "none" if self.basin else self.pruner["name"]  # a pruned trial is no evidence about an edge
        kw = {k: v for k, v in self.pruner.items() if k != "name"}
        if name == "median":
            return optuna.pruners.MedianPruner(**kw)
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(**{"max_resource": self.epochs, **kw})
        return optuna.pruners.NopPruner()

    def fixed_params(self) -> list[dict[str, Any]]:
        """For ``sampler: grid``, the params of each of the n_trials (else empty dicts)."""
        if self.sampler["name"] != "grid":
            return [{} for _ in range(self.n_trials)]
        columns = {p.key: p.grid_values(self.n_trials) for p in self.params}
        return [{k: v[i] for k, v in columns.items()} for i in range(self.n_trials)]

    def to_attrs(self) -> dict[str, Any]:
        """What a worker needs, as JSON for the study's user attributes."""
        return {"sweep": self.name, "sampler": self.sampler, "pruner": self.pruner,
                "n_trials": self.n_trials, "epochs": self.epochs, "target_acc": self.target_acc,
                "repeats": self.repeats, "population": self.population,
                **({"basin": self.basin.to_attrs()} if self.basin else {}),
                "search": {p.key: optuna.distributions.distribution_to_json(p.dist) for p in self.params}}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> SweepSpec:
        params = [Param(k, optuna.distributions.json_to_distribution(v)) for k, v in attrs["search"].items()]
        return cls(name=attrs["sweep"], grid={}, params=params, sampler=dict(attrs["sampler"]),
                   pruner=dict(attrs["pruner"]), n_trials=attrs["n_trials"], epochs=attrs["epochs"],
                   target_acc=attrs["target_acc"], repeats=attrs.get("repeats", 0),
                   population=attrs.get("population", 1),
                   basin=BasinSearch.from_attrs(attrs["basin"]) if attrs.get("basin") else None)


# ---------------------------------------------------------------------- parsing


def _distribution(key: str, spec: Any) -> optuna.distributions.BaseDistribution:
    where = f"sweep.search.{key}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}={spec!r} is not allowed; give {{low: .., high: .., log: true}} "
                          "or {choices: [...]}")
    spec = dict(spec)
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {sorted(unknown)}; allowed: type, low, high, log, "
                          "step, choices")
    if "choices" in spec:
        if not spec["choices"]:
            raise ConfigError(f"{where}.choices is empty; list at least one value")
        return optuna.distributions.CategoricalDistribution(list(spec["choices"]))
    kind = spec.get("type") or ("int" if all(isinstance(spec.get(b), int) for b in ("low", "high")) else "float")
    check_choice(f"{where}.type", kind, ("float", "int", "categorical"))
    low = check_range(f"{where}.low", spec.get("low"))
    high = check_range(f"{where}.high", spec.get("high"))
    log = check_bool(f"{where}.log", spec.get("log", False))
    if not low < high:
        raise ConfigError(f"{where}: low={low} must be below high={high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: low={low} is not allowed with log=true; it must be > 0")
    if spec.get("step") is not None:
        check_range(f"{where}.step", spec["step"], 0, low_open=True)
    if kind == "int":
        check_int(f"{where}.low", low)
        check_int(f"{where}.high", high)
        return optuna.distributions.IntDistribution(int(low), int(high), log=log, step=spec.get("step") or 1)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log, step=spec.get("step"))


def parse(raw: Mapping[str, Any], extra_overrides: Sequence[str] = ()) -> SweepSpec:
    """Validate a sweep definition completely: every cell composes and passes ``config.validate``."""
    raw = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"sweep has unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    if not raw.get("name"):
        raise ConfigError("sweep.name is missing; it names the Optuna studies and the MLflow experiment")
    check_name("sweep.name", raw["name"])
    base = [*(raw.get("base") or []), *extra_overrides]
    train_cfg = compose("train", base)
    known = set(_flat_keys(OmegaConf.to_container(train_cfg)))

    def check_key(section: str, key: str) -> None:
        if key not in known and key not in GROUPS:
            near = difflib.get_close_matches(key, sorted(known | set(GROUPS)), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"sweep.{section}: unknown key {key!r}{hint}; use a config key such as "
                              "model.bn.placement, or a config group: " + ", ".join(GROUPS))

    grid = raw.get("grid") or {}
    if not isinstance(grid, Mapping):
        raise ConfigError(f"sweep.grid={grid!r} is not allowed; map config keys to lists of values")
    for key, values in grid.items():
        check_key("grid", key)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key}={values!r} is not allowed; give a non-empty list of values")
        for v in values:
            for sub in (k for k in (v if isinstance(v, Mapping) else {}) if k != "_name"):
                check_key("grid", f"{key}.{sub}")
    basin = parse_basin(raw.get("basin"))
    search = raw.get("search") or {"optimizer.lr": {"low": 1e-4, "high": 1.0, "log": True}}
    if basin is not None:  # the search's hard limits are the LR's range
        if set(search) != {LR_KEY}:
            raise ConfigError(f"sweep.basin is not allowed with sweep.search over {', '.join(sorted(search))}; "
                              f"the bracketing search searches {LR_KEY} only (drop sweep.basin to use a sampler)")
        search = {LR_KEY: {"low": basin.low, "high": basin.high, "log": True}}
    params = []
    for key, spec in search.items():
        check_key("search", key)
        if key in GROUPS:
            raise ConfigError(f"sweep.search.{key}: {key} is a config group; put it in sweep.grid")
        if key in grid:
            raise ConfigError(f"sweep.search.{key}: already in sweep.grid; a key is gridded or searched")
        params.append(Param(key, _distribution(key, spec)))
    sampler = dict(raw.get("sampler") or {"name": "tpe", "seed": 0})
    check_choice("sweep.sampler.name", sampler.get("name"), SAMPLERS)
    if sampler.get("seed") is not None:
        check_int("sweep.sampler.seed", sampler["seed"], 0)
    pruner = dict(raw.get("pruner") or {"name": "median"})
    check_choice("sweep.pruner.name", pruner.get("name"), PRUNERS)
    spec = SweepSpec(name=str(raw["name"]), grid=dict(grid), params=params, base=base, sampler=sampler,
                     pruner=pruner, n_trials=check_int("sweep.n_trials", raw.get("n_trials", 8), 1),
                     epochs=check_int("sweep.epochs", raw.get("epochs", 3), 1),
                     target_acc=check_range("sweep.target_acc", raw.get("target_acc", 0.9), 0, 1, low_open=True),
                     description=str(raw.get("description", "")),
                     repeats=check_int("sweep.repeats", raw.get("repeats", 8), 0),
                     population=_population(raw.get("population"), params), basin=basin)
    try:
        spec.make_sampler()
        spec.make_pruner()
    except TypeError as e:
        raise ConfigError(f"sweep.sampler/pruner: {e}") from None
    for cell in spec.cells():
        try:
            cfg = compose("train", cell.overrides)
        except Exception as e:  # Hydra: unknown group option, bad override syntax
            raise ConfigError(f"sweep cell {cell.name}: {str(e).splitlines()[0]}") from None
        try:
            validate(cfg)
            if spec.population != AUTO and spec.population > 1:  # auto: a cell that cannot is trained alone
                population_check(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep cell {cell.name}: {e}") from None
    return spec


def _population(value: Any, params: list[Param]) -> int | str:
    """``population``: how many trials of a cell train together (null or 1: one at a time; auto: measured)."""
    if value is None:
        return 1
    other = [p.key for p in params if p.key != "optimizer.lr"]
    if value == AUTO:  # the fastest K on the worker's machine, K=1 included; 1 where members cannot differ
        return 1 if other else AUTO
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"sweep.population={value!r} is not allowed; it must be an integer >= 1 or auto "
                          "(trials of a cell trained together; 1: one at a time; auto: the fastest on each worker)")
    if value > 1 and other:
        raise ConfigError(f"sweep.population={value} is not allowed with sweep.search over {', '.join(other)}; "
                          "population members differ only in optimizer.lr (and seed): search only optimizer.lr, "
                          "or use population: 1")
    return value
