"""The bracketing LR search: per cell, find both edges of the set of LRs that reach the target accuracy.

Why not a sampler over a fixed range: 8 quasi-random points over 4 decades are half a decade apart and
an edge outside the range stays unseen. This search instead

1. tries a coarse start grid (one point per ``basin.coarse`` decades over ``basin.start``),
2. widens outward by ``basin.coarse`` decades (up to the hard limits ``basin.low`` / ``basin.high``)
   until the outermost trial on each side misses the target or diverges,
3. halves each edge's interval (LR points in log space) until it is ``basin.resolution`` decades wide.

Every LR is a point of one log-lattice, ``10 ** (k * resolution)`` for integer k, shared by every cell
of every sweep with that resolution, so cells pair LR for LR. The next point is a pure function of the
cell's trials (finished ones are evidence, running/waiting ones are pending), so a resumed sweep, several
workers, SLURM workers without the driver and a population claiming K trials of a cell at once need no
state of their own: with pending points an edge interval is split into more parts instead of bisected.
``basin.seeds`` > 1 runs the same search for more training seeds (``seed + SEED_STRIDE * i``), so the
report can give the basin's width a confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from bnsweep.errors import ConfigError, check_range
from bnsweep.sweep.basin import LR_KEY, Bracket, bracket, trial_points

SEED_STRIDE = 1000  # basin seed i trains with seed + 1000 * i: never one of the repeats' seed + k
SEED_INDEX = "basin_seed"  # user attribute of an LR-search trial: which basin seed it belongs to
SKIPPED = "skipped"  # user attribute of a slot finished without training: the search needed no more points
DEFAULTS: dict[str, Any] = {"low": 1e-5, "high": 1e3, "start": [1e-3, 10.0], "coarse": 1.0,
                            "resolution": 0.25, "seeds": 1}


@dataclass(frozen=True)
class BasinSearch:
    """The search's settings (the sweep's ``basin:`` block, also the study's ``basin`` attribute)."""

    low: float = DEFAULTS["low"]
    high: float = DEFAULTS["high"]
    start: tuple[float, float] = tuple(DEFAULTS["start"])  # type: ignore[assignment]
    coarse: float = DEFAULTS["coarse"]
    resolution: float = DEFAULTS["resolution"]
    seeds: int = DEFAULTS["seeds"]

    # -------------------------------------------------------------- the lattice
    def lr(self, k: int) -> float:
        return float(10 ** (k * self.resolution))

    def index(self, lr: float) -> int:
        return round(math.log10(lr) / self.resolution)

    @property
    def k_low(self) -> int:
        return math.ceil(math.log10(self.low) / self.resolution - 1e-9)

    @property
    def k_high(self) -> int:
        return math.floor(math.log10(self.high) / self.resolution + 1e-9)

    @property
    def step(self) -> int:
        """Lattice steps per coarse step (widening, start grid)."""
        return max(1, round(self.coarse / self.resolution))

    def start_points(self) -> list[int]:
        a, b = max(self.index(self.start[0]), self.k_low), min(self.index(self.start[1]), self.k_high)
        return list(range(a, b + 1, self.step)) or [a]

    def to_attrs(self) -> dict[str, Any]:
        """The study attribute ``basin`` (the report calls ``bracket`` with low/high from it)."""
        return {"low": self.low, "high": self.high, "resolution": self.resolution, "seeds": self.seeds,
                "start": list(self.start), "coarse": self.coarse}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> BasinSearch:
        a = {**DEFAULTS, **attrs}
        return cls(low=float(a["low"]), high=float(a["high"]), start=(float(a["start"][0]), float(a["start"][1])),
                   coarse=float(a["coarse"]), resolution=float(a["resolution"]), seeds=int(a["seeds"]))

    # -------------------------------------------------------------- one seed's next point
    def next_point(self, done: Mapping[int, bool], busy: set[int]) -> int | None:
        """The next lattice point for one seed, or None (nothing useful until a busy point ends, or done).

        ``done``: finished points (k -> reached the target); ``busy``: points running, waiting or failed.
        """
        tried = set(done) | busy
        for k in self.start_points():
            if k not in tried:
                return k
        ok = [k for k, r in done.items() if r]
        if not ok:  # no basin in the start grid: look between its points, then outward
            return self._split([k for k in sorted(done)], busy) if not busy else None
        a, b = min(ok), max(ok)
        below = [k for k, r in done.items() if not r and k < a]
        above = [k for k, r in done.items() if not r and k > b]
        lower = self._widen(a, busy, -1) if not below else self._split([max(below), a], busy)
        upper = self._widen(b, busy, +1) if not above else self._split([b, min(above)], busy)
        # the wider open question first: an edge not yet bracketed, then the wider bracket
        gap_lower = a - max(below) if below else math.inf
        gap_upper = min(above) - b if above else math.inf
        if lower is None or upper is None:
            return lower if upper is None else upper
        return lower if gap_lower >= gap_upper else upper

    def _widen(self, edge: int, busy: set[int], sign: int) -> int | None:
        """The next point outward of ``edge`` (beyond any busy one there), or None at the hard limit."""
        limit = self.k_low if sign < 0 else self.k_high
        out = [k for k in busy if (k - edge) * sign > 0]
        far = max(out, key=lambda k: abs(k - edge)) if out else edge
        k = far + sign * self.step
        k = max(k, limit) if sign < 0 else min(k, limit)
        return None if (k - far) * sign <= 0 else k

    def _split(self, ends: list[int], busy: set[int]) -> int | None:
        """The middle of the widest gap between ``ends`` and the busy points among them (None: all ≤ 1 step)."""
        lo, hi = min(ends), max(ends)
        cuts = sorted({*ends, *(k for k in busy if lo < k < hi)})
        gaps = [(b - a, a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b - a > 1]
        if not gaps:
            return None
        _, a, b = max(gaps, key=lambda g: (g[0], -g[1]))
        return (a + b) // 2

    # -------------------------------------------------------------- a cell
    def seed_points(self, trials: Iterable[FrozenTrial], target: float) -> dict[int, tuple[dict[int, bool], set[int]]]:
        """Per basin seed: (finished points k -> reached, busy points) of the cell's LR-search trials."""
        out: dict[int, tuple[dict[int, bool], set[int]]] = {s: ({}, set()) for s in range(self.seeds)}
        for t in trials:
            if "repeat" in t.user_attrs or t.user_attrs.get(SKIPPED) or t.user_attrs.get("lost"):
                continue
            s = int(t.user_attrs.get(SEED_INDEX, 0))
            lr = t.params.get(LR_KEY, (t.system_attrs.get("fixed_params") or {}).get(LR_KEY))
            if s not in out or lr is None:
                continue
            done, busy = out[s]
            evidence = trial_points([t], target)
            if evidence:
                done[self.index(lr)] = done.get(self.index(lr), False) or evidence[0][1]
            elif t.state != TrialState.PRUNED or t.user_attrs.get("metrics") is None:
                busy.add(self.index(lr))  # running, waiting (a retry), or crashed: not to be proposed again
        return out

    def propose(self, trials: Iterable[FrozenTrial], target: float) -> tuple[int, float] | None:
        """(basin seed, LR) of the cell's next LR-search trial; None when no point is useful now.

        The seed with the fewest points that still has work goes first, so a population's members spread
        over seeds at the same LRs.
        """
        best: tuple[int, int, float] | None = None
        for s, (done, busy) in self.seed_points(trials, target).items():
            k = self.next_point(done, busy)
            if k is not None and (best is None or len(done) + len(busy) < best[0]):
                best = (len(done) + len(busy), s, self.lr(k))
        return None if best is None else (best[1], best[2])

    def concluded(self, trials: list[FrozenTrial], target: float) -> bool:
        """Nothing running or waiting and no point left to try: the remaining slots need no training."""
        return all(not busy_running(trials, s) and self.next_point(done, busy) is None
                   for s, (done, busy) in self.seed_points(trials, target).items())

    def brackets(self, trials: Iterable[FrozenTrial], target: float) -> list[Bracket | None]:
        """One bracket per basin seed (None: no LR of that seed reached the target)."""
        by_seed = self.seed_points(trials, target)
        return [bracket([(self.lr(k), r) for k, r in done.items()], self.low, self.high)
                for done, _ in by_seed.values()]


def busy_running(trials: list[FrozenTrial], seed: int) -> bool:
    return any(t.state in (TrialState.RUNNING, TrialState.WAITING) and "repeat" not in t.user_attrs
               and int(t.user_attrs.get(SEED_INDEX, 0)) == seed and LR_KEY in t.params for t in trials)


def parse_basin(raw: Any) -> BasinSearch | None:
    """The sweep's ``basin:`` block (None: not a bracketing search), checked key by key."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep.basin={raw!r} is not allowed; give a mapping with keys {', '.join(DEFAULTS)}")
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"sweep.basin has unknown key(s) {sorted(unknown)}; allowed: {', '.join(DEFAULTS)}")
    a = {**DEFAULTS, **raw}
    low = check_range("sweep.basin.low", a["low"], 0, low_open=True)
    high = check_range("sweep.basin.high", a["high"], 0, low_open=True)
    if not low < high:
        raise ConfigError(f"sweep.basin.low={low}: must be below sweep.basin.high={high}")
    start = a["start"]
    if not (isinstance(start, list | tuple) and len(start) == 2 and low <= float(start[0]) <= float(start[1]) <= high):
        raise ConfigError(f"sweep.basin.start={start!r} is not allowed; give [lowest, highest] LR of the start "
                          f"grid, inside [basin.low, basin.high] = [{low:g}, {high:g}]")
    resolution = check_range("sweep.basin.resolution", a["resolution"], 0, 2, low_open=True)
    coarse = check_range("sweep.basin.coarse", a["coarse"], resolution)
    seeds = check_range("sweep.basin.seeds", a["seeds"], 1)
    if not isinstance(seeds, int):
        raise ConfigError(f"sweep.basin.seeds={seeds!r} is not allowed; it must be an integer >= 1")
    return BasinSearch(low=float(low), high=float(high), start=(float(start[0]), float(start[1])),
                       coarse=float(coarse), resolution=float(resolution), seeds=seeds)
