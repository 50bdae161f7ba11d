"""BN at inference: which statistics normalize a test input, and how much the choice matters.

Three ways to evaluate a trained model (seed 002's question), each logged as its own metrics:

- (a) running averages: BN's moving mean/var from training (the ordinary eval mode: ``test_acc``);
- (b) population statistics ("precise BN"): mean/var recomputed over the whole training set after
  training, with every earlier BN already using its own population statistics, as at inference;
  no weight changes (``test_acc_precise``);
- (c) batch statistics of small test batches (``test_acc_batch{1,2,8,32}``): what a model that
  kept using batch statistics would do with one instance, or a few, at a time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Every batch-statistic kind (norms.BATCH_KINDS: BatchNorm, ghost batch, batch renorm, SyncBatchNorm) holds running
# statistics and uses them at inference; layer/group/instance norms have none: (b) and (c) leave them as they are.
BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class Walk:
    """How ``precise_bn`` steps through a network: a flat ``nn.Sequential`` by default.

    population/layers.py's populations pass their own (WALK): a state of (tensor, layout) and stacked BN layers.
    """

    layers: Callable[[nn.Module], Sequence[nn.Module]] = lambda model: list(model.children())
    start: Callable[[torch.Tensor], Any] = lambda x: x  # an input chunk -> the state the layers pass on
    step: Callable[[nn.Module, Any], Any] = lambda layer, state: layer(state)
    channels: Callable[[nn.Module, Any], torch.Tensor] = lambda bn, state: state  # what a BN normalizes: (N, C, ...)
    is_bn: Callable[[nn.Module], bool] = lambda module: isinstance(module, BN_TYPES)


@torch.no_grad()
def precise_bn(model: nn.Module, train_x: torch.Tensor, chunk: int = 1000,
               cache_bytes: int = 256 * 2**20, walk: Walk = Walk()) -> nn.Module:
    """A copy of ``model`` whose BN layers hold the training set's population statistics.

    BN layers are measured in network order, so that layer k's statistics describe the inputs it
    sees at inference (earlier BN layers already normalized with population statistics).
    Variance is unbiased, like BN's running_var. The inputs of the last measured BN are kept when
    they fit in ``cache_bytes`` (an MLP's hidden layers), so the next BN's pass starts there and
    the whole job costs about one forward pass over the training set; else it restarts from the input.
    """
    model = copy.deepcopy(model).eval()
    layers = walk.layers(model)
    if sum(map(walk.is_bn, layers)) != sum(map(walk.is_bn, model.modules())):
        return _precise_nested(model, train_x, chunk, walk)
    cached: list[Any] | None = None  # the states entering layers[done], chunk by chunk
    done = 0
    for k, bn in enumerate(layers):
        if not walk.is_bn(bn):
            continue
        if cached is None:
            cached, done = [walk.start(x) for x in train_x.split(chunk)], 0
        states = [_run(walk, layers[done:k], state) for state in cached]
        mean, var = _channel_statistics([walk.channels(bn, state) for state in states])
        for buf, value in ((bn.running_mean, mean), (bn.running_var, var)):
            buf.view(-1, value.numel()).copy_(value.to(buf.dtype))  # (stacked: one row per member, or all alike)
        fits = sum(_nbytes(state) for state in states) <= cache_bytes
        cached, done = (states, k) if fits else (None, 0)
    return model


@torch.no_grad()
def _precise_nested(model: nn.Module, train_x: torch.Tensor, chunk: int, walk: Walk = Walk()) -> nn.Module:
    """precise_bn for a network with BN inside blocks (residual MLP, ResNet): one eval-mode pass over the
    training set per BN, in network order, reading its input with a hook (earlier BNs already hold theirs)."""
    for bn in [m for m in model.modules() if walk.is_bn(m)]:
        seen: list[tuple[float, torch.Tensor, torch.Tensor]] = []

        def record(m: nn.Module, args: tuple, seen: list = seen) -> None:
            seen.append(_moments(walk.channels(m, args[0] if len(args) == 1 else args)))  # a population: (x, layout)

        hook = bn.register_forward_pre_hook(record)
        try:
            for x in train_x.split(chunk):
                model(x)
        finally:
            hook.remove()
        mean, var = _combine(seen)
        for buf, value in ((bn.running_mean, mean), (bn.running_var, var)):
            buf.view(-1, value.numel()).copy_(value.to(buf.dtype))  # (stacked: one row per member, or all alike)
    return model


def _run(walk: Walk, layers: Sequence[nn.Module], state: Any) -> Any:
    for layer in layers:
        state = walk.step(layer, state)
    return state


def _nbytes(state: Any) -> int:
    parts = state if isinstance(state, tuple) else (state,)
    return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))


def _channel_statistics(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance over a list of chunks (dim 1 is the channel)."""
    return _combine([_moments(x) for x in inputs])


def _moments(x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) per channel of one chunk, in float64."""
    dims = [0, *range(2, x.dim())]
    n = x.numel() / x.shape[1]
    mean = x.sum(dims, keepdim=True) / n  # (torch.var_mean is 50x slower here on CPU)
    return n, mean.flatten().double(), (x - mean).square().sum(dims).double()


def _combine(parts: Sequence[tuple[float, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    n, mean, m2 = parts[0]
    for n_b, mean_b, m2_b in parts[1:]:  # Chan et al.'s pairwise update: stable in one pass
        delta, total = mean_b - mean, n + n_b
        mean, m2, n = mean + delta * (n_b / total), m2 + m2_b + delta * delta * (n * n_b / total), total
    return mean, m2 / max(n - 1, 1)


class _GroupStatsBN(nn.Module):
    """BN normalizing every consecutive group of ``size`` samples by that group's own statistics.

    Vectorized over groups, so batch-statistics evaluation at batch size 1 costs one pass, not
    10,000. A group of one sample has zero variance: BN then outputs its beta, as it would.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, size: int) -> None:
        super().__init__()
        self.bn, self.size = bn, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        full = n - n % self.size
        parts = [self._normalize(x[:full], self.size)] if full else []
        if full < n:
            parts.append(self._normalize(x[full:], n - full))
        return torch.cat(parts)

    def _normalize(self, x: torch.Tensor, size: int) -> torch.Tensor:
        g = x.view(len(x) // size, size, *x.shape[1:])
        dims = [1, *range(3, g.dim())]
        mean = g.mean(dims, keepdim=True)
        var = (g - mean).square().mean(dims, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + self.bn.eps)).view_as(x)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        if self.bn.weight is not None:
            y = y * self.bn.weight.view(shape) + self.bn.bias.view(shape)
        return y


def with_group_stats(model: nn.Module, size: int) -> nn.Module:
    """A copy of ``model`` whose BN layers use the statistics of each group of ``size`` inputs."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BN_TYPES):
                setattr(module, child_name, _GroupStatsBN(child, size))
    return model


def batch_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy, correct predictions and inputs of one batch, on the logits' device (no host sync).

    ``logits`` (B, C) give a (3,) tensor; a population's stacked logits (K, B, C), every member's for
    the same inputs, give (K, 3): a row per member.
    """
    if logits.dim() == 3:
        k, b, c = logits.shape
        loss = F.cross_entropy(logits.reshape(k * b, c), target.repeat(k), reduction="none").view(k, b).sum(1)
    else:
        loss = F.cross_entropy(logits, target, reduction="sum")
    correct = (logits.argmax(-1) == target).sum(-1).to(loss.dtype)
    return torch.stack([loss, correct, torch.full_like(loss, len(target))], -1)


def mean_loss_and_accuracy(sums: torch.Tensor) -> list[tuple[float, float]]:
    """(mean loss, accuracy) per row of summed ``batch_sums``: one host sync, the division on the host."""
    return [(loss / n, correct / n) for loss, correct, n in sums.view(-1, 3).tolist()]


@torch.no_grad()
@torch.no_grad()  # an evaluation builds no autograd graph (a check within the epoch runs inside training)
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             dtype: torch.dtype = torch.float32) -> list[tuple[float, float]]:
    """(mean cross-entropy, accuracy) in eval mode over ``batches`` of (inputs, labels), the model's mode restored.

    One pair, or one per member for a population (see ``batch_sums``). The sums stay on the device, in
    ``dtype``, until the end.
    """
    was_training = model.training
    model.eval()
    total = None
    for x, y in batches:
        sums = batch_sums(model(x), y)
        total = sums.to(dtype) if total is None else total.add_(sums)
    model.train(was_training)
    if total is None:
        raise ValueError("nothing to evaluate: no batches")
    return mean_loss_and_accuracy(total)


def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode, ``chunk`` inputs per forward call (sums in float64)."""
    return evaluate(model, zip(x.split(chunk), y.split(chunk), strict=True), torch.float64)[0]


def eval_modes(model: nn.Module, train_x: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
               batch_sizes: Sequence[int] = (1, 2, 8, 32), precise: bool = True,
               chunk: int = 1024) -> dict[str, float]:
    """Test metrics under (b) population statistics and (c) small-batch statistics (see module doc).

    ``chunk`` (inputs per forward call) is rounded up to a multiple of every batch size, so that
    a group never straddles two calls.
    Models without BN get the same numbers as (a), computed the same way.
    """
    chunk = math.lcm(chunk, *batch_sizes)
    out: dict[str, float] = {}
    if precise:
        out["test_loss_precise"], out["test_acc_precise"] = loss_and_accuracy(
            precise_bn(model, train_x, chunk), test_x, test_y, chunk)
    for size in batch_sizes:
        out[f"test_loss_batch{size}"], out[f"test_acc_batch{size}"] = loss_and_accuracy(
            with_group_stats(model, size), test_x, test_y, chunk)
    return out
