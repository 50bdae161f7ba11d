"""``population=auto``: how many trials to stack, measured on the machine that trains them.

Whether a population pays depends on the machine and the model: on a GPU, or a CPU whose single
trial leaves most of the matmul units idle (small layers, small batches), stacking K members turns
K small matmuls into one big one; on a CPU where one trial already runs near the matmul peak it
only adds per-member work. No fixed K is right everywhere, so a worker measures.

The probe times a few training steps and a few evaluation calls of the real model shape, batch
size and optimizer for each candidate K (K=1 the plain model with torch's optimizer, as a single
run trains; K>1 the stacked network with the stacked optimizer), predicts each candidate's
trials/hour for a whole trial (training steps plus validation, per epoch), and picks the best. K=1
is always a candidate, and a K>1 must beat it by ``MARGIN`` (the single path has none of a
population's per-member bookkeeping in the probe), so ``auto`` is never much slower than one trial
at a time. The answer is cached per machine and shape (``~/.cache/bnsweep/population_auto.json``),
so a sweep's workers probe once per machine, not once per trial.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from bnsweep.config import instantiate
from bnsweep.defaults import PROBE
from bnsweep.errors import ConfigError
from bnsweep.population.checks import check
from bnsweep.population.layers import StackedNet
from bnsweep.population.loop import device_of, eval_chunk, run_population
from bnsweep.population.optim import StackedOptimizer
from bnsweep.training.data import InMemoryDataModule
from bnsweep.training.lr_scaling import effective_lr, make_optimizer, optimizer_options
from bnsweep.training.run import run_training

log = logging.getLogger("bnsweep.population")

# conf/run_sweep.yaml's population_probe (each key's meaning is written there)
CPU_CANDIDATES = tuple(PROBE.cpu_candidates)
GPU_CANDIDATES = tuple(PROBE.gpu_candidates)
MARGIN = float(PROBE.margin)  # a population must predict this many times K=1's trials/hour to be chosen
PROBE_STEPS, PROBE_ROUNDS = int(PROBE.steps), int(PROBE.rounds)
SLICE_STEPS, EVAL_SLICE, SHORTLIST = int(PROBE.slice_steps), int(PROBE.eval_slice), int(PROBE.shortlist)
CACHE_VERSION = 3


def cache_path() -> Path:
    """Where probes are remembered: $XDG_CACHE_HOME/bnsweep (default ~/.cache/bnsweep)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "bnsweep" / "population_auto.json"


def machine_key(device: torch.device) -> str:
    """This machine as far as speed goes: host, CPU, torch threads and version, the GPU if used."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return "|".join([platform.node(), platform.processor() or platform.machine(), f"threads={torch.get_num_threads()}",
                     torch.__version__, gpu])


def layer_shapes(cfg: DictConfig, dm: InMemoryDataModule) -> list:
    """The model's weighted layers and their shapes: what its cost depends on (not its activations or init)."""
    model = instantiate(cfg.model, in_shape=dm.in_shape, num_classes=dm.num_classes)
    return [(type(m).__name__, [list(p.shape) for p in m.parameters(recurse=False)]) for m in model.modules()
            if any(True for _ in m.parameters(recurse=False))]


def shape_key(cfg: DictConfig, dm: InMemoryDataModule, candidates: Sequence[int]) -> str:
    """What the probe's answer depends on: the weighted layers, input shape, data sizes, batch size, epochs,
    optimizer (not its learning rate), the end-of-trial evaluations, and the candidates."""
    opt = OmegaConf.to_container(cfg.optimizer, resolve=True)
    opt = {k: v for k, v in opt.items() if k != "lr"}
    sizes = {k: len(v) for k, v in dm.tensors.items() if k.endswith("_x")}
    what = {"layers": layer_shapes(cfg, dm), "in": list(dm.in_shape), "sizes": sizes,
            "batch": dm.batch_size, "epochs": int(cfg.trainer.max_epochs), "optimizer": opt,
            "eval": [str(cfg.train.get(k)) for k in ("eval_batch_sizes", "precise_bn", "train_eval_size")],
            "candidates": list(candidates), "v": CACHE_VERSION}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def candidates_for(device: torch.device) -> tuple[int, ...]:
    return GPU_CANDIDATES if device.type == "cuda" else CPU_CANDIDATES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(cfg: DictConfig, dm: InMemoryDataModule, k: int, device: torch.device) -> list[torch.nn.Module]:
    torch.manual_seed(int(cfg.seed))
    return [instantiate(cfg.model, in_shape=dm.in_shape, num_classes=dm.num_classes).to(device) for _ in range(k)]


class Candidate:
    """K members ready to step (K=1: the plain model with torch's optimizer, as a single run trains)."""

    def __init__(self, cfg: DictConfig, dm: InMemoryDataModule, k: int, device: torch.device) -> None:
        self.k, self.device, self.b = k, device, dm.batch_size
        self.x, self.y = dm.tensors["train_x"], dm.tensors["train_y"]
        self.gen = torch.Generator().manual_seed(k)
        models = _models(cfg, dm, k, device)
        if k == 1:
            self.net: torch.nn.Module = models[0]
            self.opt = make_optimizer(cfg)(self.net.parameters())
        else:
            self.net = StackedNet(models).to(device)
            self.opt = StackedOptimizer(list(self.net.parameters()), optimizer_options(cfg),
                                        torch.full((k,), effective_lr(cfg)))
        chunk = eval_chunk(dm.eval_batch_size, k) if k > 1 else dm.eval_batch_size  # as the population evaluates
        self.eval_x = self.x[:chunk].to(device)

    def step_s(self, steps: int) -> float:
        """Median seconds of one training step (forward, loss, backward, optimizer step)."""
        k, b = self.k, self.b
        self.net.train()
        times = []
        for _ in range(steps):
            j = torch.randint(0, len(self.x), (b,), generator=self.gen).to(self.x.device)
            x, y = self.x[j].to(self.device), self.y[j].to(self.device)
            start = time.perf_counter()
            logits = self.net(x)
            if k == 1:
                loss = F.cross_entropy(logits, y)
            else:
                per = F.cross_entropy(logits.reshape(k * b, -1), y.repeat(k), reduction="none")
                loss = per.view(k, b).mean(1).sum()  # as population.loop.train_step
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            _sync(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    @torch.no_grad()
    def eval_s_per_input(self) -> float:
        self.net.eval()
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            self.net(self.eval_x)
            _sync(self.device)
            best = min(best, time.perf_counter() - start)
        return best / len(self.eval_x)


def slice_trial_s(cfg: DictConfig, dm: InMemoryDataModule, k: int, steps: int) -> float:
    """Wall seconds of a real one-epoch trial on the first ``steps`` batches: K=1 through ``run_training`` (Lightning,
    as a sweep trial), K>1 through ``run_population``; set-up, validation, test and precise BN included."""
    view = copy.copy(dm)  # the same tensors, shorter: the rest is extrapolated (``predict``)
    n = {"train": steps * dm.batch_size, "val": EVAL_SLICE, "test": EVAL_SLICE}
    view.tensors = {name: t[: n[name.split("_")[0]]] for name, t in dm.tensors.items()}
    with tempfile.TemporaryDirectory() as store:
        one = cfg.copy()
        for key, value in (("trainer.max_epochs", 1), ("tracking.store_dir", store), ("train.target_acc", 1.0)):
            OmegaConf.update(one, key, value, merge=False)
        start = time.perf_counter()
        if k == 1:
            run_training(one, datamodule=view, track=False)
        else:
            run_population([one] * k, datamodule=view, track=False)
        return time.perf_counter() - start


def eval_inputs(cfg: DictConfig, n_train: int, n_val: int, n_test: int) -> int:
    """Inputs a trial evaluates: validation each epoch, the test set (running, precise BN, each small batch size),
    precise BN's pass over the training set and the training subset of ``train_acc_eval``."""
    precise = bool(cfg.train.get("precise_bn", True))
    tests = 1 + precise + len(cfg.train.get("eval_batch_sizes") or ())
    train_eval = min(int(cfg.train.get("train_eval_size", 5000) or 0), n_train)
    return int(cfg.trainer.max_epochs) * n_val + tests * n_test + precise * n_train + train_eval


def predict(cfg: DictConfig, k: int, slice_s: float, slice_steps: int, step_s: float, eval_s_per_input: float,
            dm: InMemoryDataModule) -> float:
    """Trials/hour of K members: the timed slice (a whole short trial) plus the steps and evaluations it lacked."""
    t = {name: len(v) for name, v in dm.tensors.items()}
    steps = int(cfg.trainer.max_epochs) * math.ceil(t["train_x"] / dm.batch_size) - slice_steps
    done = 0
    if slice_steps:
        done = eval_inputs(_one_epoch(cfg), min(slice_steps * dm.batch_size, t["train_x"]),
                           min(EVAL_SLICE, t["val_x"]), min(EVAL_SLICE, t["test_x"]))
    evals = eval_inputs(cfg, t["train_x"], t["val_x"], t["test_x"]) - done
    trial_s = slice_s + steps * step_s + evals * eval_s_per_input
    return k / trial_s * 3600


def _one_epoch(cfg: DictConfig) -> DictConfig:
    one = cfg.copy()
    OmegaConf.update(one, "trainer.max_epochs", 1, merge=False)
    return one


def probe(cfg: DictConfig, dm: InMemoryDataModule, candidates: Sequence[int], device: torch.device,
          steps: int = PROBE_STEPS, rounds: int = PROBE_ROUNDS) -> tuple[dict[int, float], dict[int, float]]:
    """(steps only, whole trial): predicted trials/hour per candidate K.

    First every candidate's training step, in interleaved rounds (a busy moment hits all K alike; each K
    keeps its best round); then K=1 and the ``SHORTLIST`` fastest populations as real short trials, which
    adds what a trial costs besides its steps (set-up, Lightning, evaluation; populations share it).
    """
    pool = {k: Candidate(cfg, dm, k, device) for k in sorted(set(candidates) | {1})}
    for c in pool.values():
        c.step_s(3)  # warm-up: lazy optimizer state, allocator, kernels
    step = dict.fromkeys(pool, math.inf)
    for _ in range(rounds):
        for k, c in pool.items():
            step[k] = min(step[k], c.step_s(steps))
    evals = {k: c.eval_s_per_input() for k, c in pool.items()}
    steps_only = {k: predict(cfg, k, 0.0, 0, step[k], evals[k], dm) for k in pool}
    short = sorted((k for k in pool if k > 1), key=steps_only.__getitem__, reverse=True)[:SHORTLIST]
    n = min(SLICE_STEPS, math.ceil(len(dm.tensors["train_x"]) / dm.batch_size))
    slice_trial_s(cfg, dm, 1, 1)  # warm-up: a process's first trial pays one-time costs (Lightning, MLflow imports)
    slices = {k: slice_trial_s(cfg, dm, k, n) for k in [1, *short]}
    whole = {k: predict(cfg, k, slices[k], n, step[k], evals[k], dm) for k in slices}
    return steps_only, whole


def best_k(rates: dict[int, float], margin: float = MARGIN) -> int:
    """The fastest K; a population only if it beats one trial at a time by ``margin``."""
    k = max(rates, key=rates.__getitem__)
    return k if k == 1 or rates[k] >= margin * rates[1] else 1


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, entries: dict) -> None:
    """Atomic write: concurrent workers each leave a whole file (the last one wins)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: probe again next time
        log.warning("population=auto: could not cache the probe in %s (%s)", path, e)


def choose(cfg: DictConfig, dm: InMemoryDataModule, candidates: Sequence[int] | None = None,
           limit: int | None = None) -> tuple[int, dict]:
    """The K to train with for ``cfg``'s cell on this machine, and the probe record (``cached``: from an earlier probe).

    K=1 when the cell cannot be a population (``population.checks``); ``limit`` caps K (e.g. the
    trials left in the cell).
    """
    try:
        check(cfg)
    except ConfigError as e:
        return 1, {"reason": str(e)}
    device = device_of(cfg)
    if cfg.get("threads"):  # the trials' own threads, as training sets them (training.run.prepare)
        torch.set_num_threads(int(cfg.threads))
    candidates = tuple(candidates or candidates_for(device))
    path = cache_path()
    key = f"{machine_key(device)}|{shape_key(cfg, dm, candidates)}"
    with _locked(path):  # one worker probes; the others wait and read its answer (and do not slow its timing)
        record = _load(path).get(key)
        if record is None:
            record = _probe_and_store(cfg, dm, candidates, device, path, key)
        else:
            record = {**record, "cached": True}
    k = int(record["k"])
    return (min(k, limit) if limit else k), record


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the cache file (none where the folder cannot be written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 (held for the block)
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _probe_and_store(cfg: DictConfig, dm: InMemoryDataModule, candidates: Sequence[int], device: torch.device,
                     path: Path, key: str) -> dict:
    """Probe now and add the answer to the cache (the caller holds the lock)."""
    if dm.tensors["train_x"].device != device:
        dm.tensors = {n: v.to(device) for n, v in dm.tensors.items()}
    started = time.perf_counter()
    steps, rates = probe(cfg, dm, candidates, device)
    record = {"rates": {str(k): r for k, r in rates.items()}, "steps": {str(k): r for k, r in steps.items()},
              "k": best_k(rates), "probe_s": time.perf_counter() - started, "at": time.time()}
    _save(path, _load(path) | {key: record})
    log.info("population=auto: probed K in %s on %s in %.1f s: %s -> K=%d", list(steps), device, record["probe_s"],
             ", ".join(f"K={k}: {r:.0f}/h" for k, r in rates.items()), record["k"])
    return {**record, "cached": False}
