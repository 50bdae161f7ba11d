"""Population training: K trials of one cell trained as one stacked network (``sweep.population=K``).

Members share the architecture and every setting but the learning rate and the seed. Each starts
from the weights its own single run would (the single model is built with the member's seed and
then stacked), draws its mini-batches in the order its own ``data.seed`` gives (members with the
same data seed share each batch), keeps its own optimizer state and BN statistics, and ends as its
own run: the same history, final metrics, MLflow run and Optuna report as ``train.run_training``,
within float tolerance. A member that diverges or is pruned is cut out of the stacked tensors at
once and finished; the others go on untouched.

Time is shared: a member's ``epoch_time_s`` and ``runtime_s`` are its share of the population's
wall time (split evenly among the members training at that moment), i.e. what it cost.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import lightning.pytorch as pl
import optuna
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from bnsweep.errors import ConfigError
from bnsweep.population.checks import check
from bnsweep.population.layers import WALK, StackedBatchNorm, StackedNet
from bnsweep.population.optim import StackedOptimizer
from bnsweep.tracking.runs import RunTracker, flatten
from bnsweep.training import bn_eval, trainable
from bnsweep.training.checks import validate
from bnsweep.training.data import InMemoryDataModule, MinibatchChunks
from bnsweep.training.lr_scaling import effective_lr, optimizer_options
from bnsweep.training.models import param_counts
from bnsweep.training.pruning import report_check
from bnsweep.training.run import (
    OFFLINE,
    RunResult,
    abort_tracker,
    build_model,
    check_metrics,
    close_tracker,
    epoch_metrics,
    epoch_size,
    final_metrics,
    new_tracker,
    prepare,
    stage_run,
    test_metrics,
    train_eval_size,
)

log = logging.getLogger("bnsweep.population")
MEMBER_KEYS = ("optimizer.lr", "seed")  # what members may differ in (data.seed follows seed)
_FREE = (*MEMBER_KEYS, "data.seed", "tracking.run_name")


def _without_free(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in _FREE:
        *path, last = key.split(".")
        node = c
        for p in path:
            node = node.get(p, {})
        node.pop(last, None)
    return flatten(c)


def check_members(cfgs: Sequence[DictConfig]) -> None:
    """Members may differ only in learning rate and seed."""
    first = _without_free(cfgs[0])
    for cfg in cfgs[1:]:
        other = _without_free(cfg)
        diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if diff:
            raise ConfigError(f"population members differ in {', '.join(diff[:5])}; only "
                              f"{', '.join(MEMBER_KEYS)} may differ within a population")


def device_of(cfg: DictConfig) -> torch.device:
    """The trainer's accelerator, as Lightning would pick it for one device."""
    acc = str(cfg.trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={acc} but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(eq=False)
class Member:
    """One trial inside the population: its config, its run, and its share of the time."""

    index: int  # position in the caller's list
    cfg: DictConfig
    model: torch.nn.Module  # the single model: the member's weights go back into it at the end
    tracker: RunTracker | None = None
    trial: optuna.Trial | None = None  # reported to and pruned by Optuna when given
    heartbeat: Callable[[], None] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    checks: list[dict[str, float]] = field(default_factory=list)  # every validation check, as a single run's
    runtime: float = 0.0
    epoch_time: float = 0.0


class BatchOrder:
    """Each member's mini-batches in its own single run's order: one seeded permutation per data seed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seeds: Sequence[int]) -> None:
        self.orders = {s: MinibatchChunks(x, y, batch_size, 1, True, s) for s in dict.fromkeys(seeds)}

    def epoch(self, seeds: Sequence[int]) -> tuple[list[torch.Tensor], bool]:
        """This epoch's steps for members with ``seeds``: (B,) indices when all share one order, else (K, B)."""
        per_seed = {s: o.batch_indices() for s, o in self.orders.items()}  # every order advances, as alone
        if len(set(seeds)) == 1:
            return per_seed[seeds[0]], False
        first = per_seed[seeds[0]]
        full = torch.stack([torch.cat(per_seed[s]) for s in seeds])
        return list(full.split([len(i) for i in first], dim=1)), True


def train_step(net: StackedNet, opt: StackedOptimizer, x: torch.Tensor, y: torch.Tensor, per_member: bool,
               sums: torch.Tensor) -> int:
    """One optimizer step of every member; adds (loss*n, correct) per member to ``sums`` (no host sync).

    Returns n, the batch size (the same for every member).
    """
    logits = net(x, per_member)
    k, b, c = logits.shape
    target = y if per_member else y.repeat(k)
    losses = F.cross_entropy(logits.reshape(k * b, c), target.reshape(-1), reduction="none").view(k, b).mean(1)
    opt.zero_grad()
    losses.sum().backward()  # member k's gradients come from its own loss only
    opt.step()
    with torch.no_grad():
        correct = logits.argmax(2).view(-1) == target.view(-1)
        sums[:, 0].add_(losses, alpha=b)
        sums[:, 1] += correct.view(k, b).sum(1)
    return b


def eval_chunk(chunk: int, k: int) -> int:
    """Inputs per evaluation call: ``data.eval_batch_size`` split among the members (K times the work per
    input), so that a call's activations stay in cache. Evaluation is per input: the numbers do not change."""
    return max(64, chunk // k)


class StackedGroupStatsBN(torch.nn.Module):
    """A stacked BN normalizing each group of ``size`` inputs by the group's own statistics, per member:
    ``bn_eval``'s small-batch evaluation (c) for all members in one pass."""

    def __init__(self, bn: StackedBatchNorm, size: int) -> None:
        super().__init__()
        self.bn = bn
        flat = SimpleNamespace(eps=bn.eps, weight=bn.flat("weight"), bias=bn.flat("bias"))
        self.group = bn_eval._GroupStatsBN(flat, size)  # K*C channels: statistics per member (its private helper)

    def forward(self, x: torch.Tensor, layout: str) -> tuple[torch.Tensor, str]:
        k, c = self.bn.shape
        y = self.group(self.bn.channels(x, layout))
        if self.bn.spatial:
            return y, "channels"
        return y.view(len(y), k, c).transpose(0, 1).contiguous(), "features"


def small_batch_metrics(net: StackedNet, x: torch.Tensor, y: torch.Tensor, sizes: Sequence[int],
                        chunk: int) -> list[dict[str, float]]:
    """``test_{loss,acc}_batch{size}`` per member: every member at once (a single run: ``bn_eval.eval_modes``).

    Calls hold a multiple of every size, so groups are the same consecutive test inputs as a single run's.
    """
    out: list[dict[str, float]] = [{} for _ in range(net.k)]
    if not sizes:
        return out
    step = math.lcm(eval_chunk(chunk, net.k), *sizes)
    for size in sizes:
        grouped = copy.deepcopy(net)
        for stacked in [m for m in grouped.modules() if isinstance(m, StackedNet)]:  # residual blocks' BNs too
            stacked.layers = torch.nn.ModuleList(StackedGroupStatsBN(m, size) if isinstance(m, StackedBatchNorm)
                                                 else m for m in stacked.layers)
        rows = bn_eval.evaluate(grouped, zip(x.split(step), y.split(step), strict=True), torch.float64)
        for member, (loss, acc) in zip(out, rows, strict=True):
            member[f"test_loss_batch{size}"], member[f"test_acc_batch{size}"] = loss, acc
    return out


def evaluate(net: StackedNet, x: torch.Tensor, y: torch.Tensor, chunk: int) -> list[tuple[float, float]]:
    """(mean loss, accuracy) per member in eval mode (BN running statistics), ``chunk`` inputs per call.

    The single run's evaluation (``bn_eval.evaluate``), on the stacked logits: a row of sums per member.
    """
    chunk = eval_chunk(chunk, net.k)
    return bn_eval.evaluate(net, zip(x.split(chunk), y.split(chunk), strict=True))


class Population:
    """The training loop: a stacked network, its optimizer, and the members still in it."""

    def __init__(self, members: list[Member], dm: InMemoryDataModule, device: torch.device,
                 on_done: Callable[[Member, RunResult], None]) -> None:
        base = members[0].cfg
        self.members, self.active, self.dm, self.on_done = members, list(members), dm, on_done
        self.counts = param_counts(members[0].model)
        self.net = StackedNet([m.model for m in members]).to(device)
        trainable.follow(members[0].model, self.net)  # train.trainable, as each member's single model has it
        self.opt = StackedOptimizer(trainable.trainable(self.net), optimizer_options(base),
                                    torch.tensor([effective_lr(m.cfg) for m in members]))
        t = dm.tensors
        self.order = BatchOrder(t["train_x"], t["train_y"], dm.batch_size, [int(m.cfg.data.seed) for m in members])
        self.chunk_steps, self.max_loss = dm.chunk_steps, float(base.train.max_loss)
        self.sums = torch.zeros(len(members), 2, device=device)  # per member: loss * n, correct
        self.val_every, self.train_size = base.train.get("val_every"), epoch_size(dm)[0]
        self.steps = self.samples = 0  # optimizer steps and training samples so far (the same for every member)
        self.clock = time.perf_counter()

    def charge(self) -> None:
        """Split the wall time since the last call evenly among the members training now."""
        now = time.perf_counter()
        share = (now - self.clock) / max(len(self.active), 1)
        for m in self.active:
            m.runtime += share
            m.epoch_time += share
        self.clock = now

    def drop(self, positions: Sequence[int], outcome: str) -> torch.Tensor:
        """Finish these members (positions in ``active``), cut them from the stacked tensors; return the rest."""
        gone = [self.active[j] for j in positions]
        keep = torch.tensor([j for j in range(len(self.active)) if j not in set(positions)], dtype=torch.long,
                            device=self.sums.device)
        self.active = [m for m in self.active if m not in gone]
        if self.active:
            self.net.keep(keep)
            self.opt.keep(keep)
            self.sums = self.sums[keep]
        for m in gone:
            self.finish(m, outcome)
        self.clock = time.perf_counter()  # finishing (logging) is nobody's training time
        return keep

    def finish(self, m: Member, outcome: str, test: tuple[float, float] | None = None,
               precise: tuple[float, float] | None = None, eval_s: float = 0.0,
               small: dict[str, float] | None = None, train_eval: tuple[float, float] | None = None) -> None:
        """``eval_s``: the member's share of the population's test evaluation (its ``eval_time_s``);
        ``small``, ``train_eval``: its small-batch test metrics and its (loss, accuracy) in eval mode on the
        training subset (``train_acc_eval``), measured for all members at once."""
        final = final_metrics(m.cfg, m.history, m.checks, self.dm, outcome, m.runtime, self.counts)
        if test is not None:
            started = time.perf_counter()
            cfg = m.cfg
            if small is not None:  # measured already: test_metrics must not run them again, one member at a time
                cfg = m.cfg.copy()
                OmegaConf.update(cfg, "train.eval_batch_sizes", [], merge=False)
            final |= test_metrics(cfg, m.model, self.dm, *test, precise=precise, train_eval=train_eval) | (small or {})
            final["eval_time_s"] = eval_s + time.perf_counter() - started
        if m.tracker:
            close_tracker(m.tracker, m.cfg, m.model, self.dm, final, outcome, self.steps)
        result = RunResult(m.tracker.run_id if m.tracker else None, final, m.history, outcome, m.tracker, m.checks)
        self.on_done(m, result)

    def run_epoch(self, epoch: int) -> None:
        t = self.dm.tensors
        for m in self.active:
            m.epoch_time = 0.0
        self.sums.zero_()
        n = 0
        steps, per_member = self.order.epoch([int(m.cfg.data.seed) for m in self.active])
        stopping: dict[int, str] = {}  # position in active -> outcome, for members to drop at the chunk's end
        for start in range(0, len(steps), self.chunk_steps):
            for i, idx in enumerate(steps[start : start + self.chunk_steps], start):
                b = train_step(self.net, self.opt, t["train_x"][idx], t["train_y"][idx], per_member, self.sums)
                n, self.steps, self.samples = n + b, self.steps + 1, self.samples + b
                if self.val_every and (i + 1) % self.val_every == 0 and i < len(steps) - 1:
                    self.find_diverged(n, epoch, stopping)  # as a single run, which stops at this step
                    self.check(stopping)
            # One host sync per chunk, as a single run: stop a diverging member at once.
            self.find_diverged(n, epoch, stopping)
            self.charge()
            if not stopping:
                continue
            keep = self.stop(stopping)
            stopping = {}
            if not self.active:
                return
            if per_member:  # the survivors' own orders; a single one left is one index tensor per step
                one = len({int(m.cfg.data.seed) for m in self.active}) == 1
                steps = [s[int(keep[0])] if one else s.index_select(0, keep) for s in steps]
                per_member = not one
        train = [(loss / n, correct / n) for loss, correct in self.sums.tolist()]
        for j, m in enumerate(self.active):
            m.history.append({"epoch": epoch, "train_loss": train[j][0], "train_acc": train[j][1],
                              "val_loss": math.nan, "val_acc": math.nan, "epoch_time_s": 0.0, "step": self.steps})
        self.check(stopping)  # the epoch's end: fills in the history rows' val_loss, val_acc
        self.charge()
        for j, m in enumerate(self.active):
            m.history[-1]["epoch_time_s"] = m.epoch_time
            if j in stopping:  # (a pruned single run never reaches its epoch logger either)
                continue
            if m.tracker:
                m.tracker.log(epoch_metrics(m.history[-1]), step=self.steps)
            if m.heartbeat:
                m.heartbeat()
        if stopping:
            self.stop(stopping)

    def find_diverged(self, n: int, epoch: int, stopping: dict[int, str]) -> None:
        """Mark members whose mean training loss this epoch is NaN/inf or above ``train.max_loss`` (one host sync)."""
        for j, v in enumerate(loss / n for loss in self.sums[:, 0].tolist()):
            if j not in stopping and (not math.isfinite(v) or v > self.max_loss):
                log.warning("member %d diverged: training loss %.3g in epoch %d", self.active[j].index, v, epoch)
                stopping[j] = "diverged"

    def check(self, stopping: dict[int, str]) -> None:
        """A validation check of every member still training, at the step its single run would check.

        Each member records, logs and reports it as ``ClassifierModule`` and ``CheckPruning`` would; a
        member its pruner stops is marked "pruned" in ``stopping`` (dropped at the chunk's end, having
        stopped here: nothing it does until then is recorded). At an epoch's end it also fills in the
        member's history row.
        """
        t = self.dm.tensors
        val = evaluate(self.net, t["val_x"], t["val_y"], self.dm.eval_batch_size)
        for j, m in enumerate(self.active):
            if j in stopping:
                continue
            row = {"step": self.steps, "samples": self.samples, "val_epoch": self.samples / self.train_size,
                   "val_loss": val[j][0], "val_acc": val[j][1]}
            m.checks.append(row)
            if m.history and m.history[-1]["step"] == self.steps:
                m.history[-1] |= {"val_loss": val[j][0], "val_acc": val[j][1]}
            if m.tracker:
                m.tracker.log(check_metrics(row), step=self.steps)
            if m.trial is not None and report_check(m.trial, row):
                stopping[j] = "pruned"

    def stop(self, stopping: dict[int, str]) -> torch.Tensor:
        """Drop the marked members (diverged first, then pruned); return the positions kept, as ``drop``."""
        keep = torch.arange(len(self.active), device=self.sums.device)
        for outcome in ("diverged", "pruned"):
            gone = [int(p) for p, j in enumerate(keep.tolist()) if stopping.get(j) == outcome]
            if gone:
                keep = keep[self.drop(gone, outcome)]
        return keep

    def run(self, epochs: int) -> None:
        for epoch in range(1, epochs + 1):
            self.run_epoch(epoch)
            if not self.active:
                return
        t, chunk = self.dm.tensors, self.dm.eval_batch_size
        evaluated = time.perf_counter()
        test = evaluate(self.net, t["test_x"], t["test_y"], chunk)
        precise: list = [None] * len(self.active)
        if self.members[0].cfg.train.get("precise_bn", True):  # population statistics of all members at once
            net = bn_eval.precise_bn(self.net, t["train_x"], eval_chunk(chunk, self.net.k), walk=WALK)
            precise = evaluate(net, t["test_x"], t["test_y"], chunk)
        sizes = list(self.members[0].cfg.train.get("eval_batch_sizes") or ())
        small = small_batch_metrics(self.net, t["test_x"], t["test_y"], sizes, chunk)
        n = train_eval_size(self.members[0].cfg, self.dm)  # train_acc_eval of all members at once
        train_eval = evaluate(self.net, t["train_x"][:n], t["train_y"][:n], chunk) if n else [None] * len(self.active)
        share = (time.perf_counter() - evaluated) / len(self.active)
        for j, m in enumerate(self.active):
            m.model.load_state_dict(self.net.member_state(j))
            self.finish(m, "completed", test[j], precise[j], share, small[j], train_eval[j])
        self.active = []


def run_population(cfgs: Sequence[DictConfig], *, datamodule: InMemoryDataModule | None = None,
                   tags: Sequence[dict[str, str] | None] | None = None, parent_run_id: str | None = None,
                   track: bool | str = True, background_logging: bool = False,
                   trials: Sequence[optuna.Trial | None] | None = None,
                   heartbeats: Sequence[Callable[[], None] | None] | None = None,
                   on_done: Callable[[int, RunResult], None] | None = None) -> list[RunResult]:
    """Train ``cfgs`` (one per member) as one population; each member's result as ``run_training``'s.

    ``trials[i]`` (optional) is reported each epoch and may prune member i; ``on_done(i, result)`` is
    called as soon as member i finishes (diverged and pruned members finish early), so a sweep can
    tell Optuna at once. With ``background_logging`` the caller must ``close()`` each result's tracker.
    """
    base = cfgs[0]
    for cfg in cfgs:
        validate(cfg)
        check(cfg)
    check_members(cfgs)
    uri, dm = prepare(base, datamodule, track)
    device = device_of(base)
    dm.tensors = {k: v.to(device) for k, v in dm.tensors.items()}  # resident on the training device
    members = []
    for i, cfg in enumerate(cfgs):
        pl.seed_everything(int(cfg.seed), workers=False, verbose=False)  # as its single run: same init
        model = build_model(cfg, dm).to(device)
        members.append(Member(i, cfg, model, trial=trials[i] if trials else None,
                              heartbeat=heartbeats[i] if heartbeats else None))
    results: dict[int, RunResult] = {}

    def done(m: Member, result: RunResult) -> None:
        if m.tracker and not background_logging:
            m.tracker.close()
        results[m.index] = result
        if on_done:
            on_done(m.index, result)

    try:
        for m in members if track else ():
            own = {**((tags[m.index] if tags else None) or {}), "bnsweep.population": str(len(cfgs))}
            m.tracker = new_tracker(m.cfg, uri, parent_run_id, background_logging, own, offline=track == OFFLINE)
            stage_run(m.tracker, m.cfg, dm, m.model, device)
        pop = Population(members, dm, device, done)
        pop.run(int(base.trainer.max_epochs))
    except BaseException as e:
        for m in members:
            if m.index not in results and m.tracker:
                abort_tracker(m.tracker, e)
        raise
    return [results[i] for i in range(len(cfgs))]
