"""Each claim measured in each of its settings, tested, corrected for multiplicity, and summarized.

Per setting: the two arms' values per training seed (report/registry.py says which trials a protocol uses),
paired by seed; a test that fits the metric (stats.py: t-test, exact sign-flip test on a lattice, sign test
for censored values, non-inferiority, equivalence); Holm's correction over each claim's rows of one protocol.
A row whose metric is read where BN normalizes by construction in either arm gets no verdict, only a note.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bnsweep.config import compose
from bnsweep.report.registry import CLAIMS, Arm, Claim, Setting
from bnsweep.report.results import POINT_MEASURES, CellResult, TrialResult, layer_index
from bnsweep.report.seeds import SEED_VALUES
from bnsweep.stats import (
    Interval,
    Test,
    censored_pairs,
    decide,
    equivalence,
    fit_digits,
    holm,
    non_inferiority,
    superiority,
)
from bnsweep.training.norms import canonical, legacy

LATTICE = {"basin_upper", "basin_width"}  # values on the LR search's lattice (its resolution, in decades)
RATIO = {"s_per_epoch", "latency"}  # compared as log ratios, shown as ratios
POINTS = POINT_MEASURES  # metric -> (diagnostics point, first hidden layer): where the metric reads the network
SCALE = {"test_acc": (100.0, " pp"), "train_acc_eval": (100.0, " pp"), "train_test_gap": (100.0, " pp"),
         "precise_bn_gain": (100.0, " pp"), "saturation": (100.0, " pp")}
UNITS = {"basin_upper": " dec.", "basin_width": " dec.", "epochs_to_converge": " epochs", "grad_ratio": " dec.",
         "drift": ""}


@dataclass
class Study:
    """What the claims need of one sweep: its collected cells."""

    cells: Sequence[CellResult]

    def cell(self, a: Arm) -> CellResult | None:
        return next((c for c in self.cells if a.matches(c.labels)), None)


@dataclass
class Row:
    claim: Claim
    setting: Setting
    test: Test | None = None
    first: float = math.nan
    second: float = math.nan
    verdict: str = "not_resolved"
    p_adjusted: float = math.nan
    note: str = ""
    construction: str = ""  # why the metric is normalized by construction here ('' if it is not)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tested(self) -> bool:
        return self.test is not None and not self.construction and self.test.iv.n >= 2


# ---------------------------------------------------------------------- what a metric reads, and whether it can move


def normalized_by_construction(point: str, first_layer: int, bn: Mapping[str, Any]) -> str:
    """Why ``point`` (from hidden layer ``first_layer`` on) is BN's own output, or an elementwise function of it,
    in a network with this ``model.bn`` ('' when it is not): such a value is normalized by definition, so a
    difference there is no evidence about BN's effect."""
    placement = bn.get("placement", "none")
    if point == "act_in" and placement == "before_act":
        return "the activation's input is BN's output when BN comes before the activation"
    if point == "linear_in":
        if placement == "after_act" and first_layer >= 2:
            return "a hidden Linear's input is BN's output when BN comes after the activation"
        if placement == "before_act" and first_layer >= 2:
            return "a hidden Linear's input is the activation of BN's output"
        if bn.get("input") and first_layer == 1:
            return "the first Linear's input is input BN's output"
    return ""


_BN_CACHE: dict[tuple[str, ...], dict[str, Any]] = {}


def bn_of(cell: CellResult) -> dict[str, Any]:
    """The cell's normalization as its overrides compose it, with ``placement`` none for kind=none (cached)."""
    key = tuple(cell.overrides)
    if key not in _BN_CACHE:
        model = compose("train", list(key)).model
        norm = canonical(model.get("norm"), model.get("bn"))  # the old model.bn keys mapped in, any kind
        _BN_CACHE[key] = {**norm, **legacy(norm)}
    return _BN_CACHE[key]


# ---------------------------------------------------------------------- values per seed


def samples(cell: CellResult, s: Setting) -> dict[int, TrialResult]:
    """The trials a protocol compares, by training seed: the repeats (tuned_lr), the LR-search trials at the
    shared rate (fixed_lr), or every finished trial of an as-stated cell trained at one rate."""
    done = [t for t in cell.trials if t.state in ("complete", "diverged") and t.metrics and t.seed is not None]
    if s.protocol == "tuned_lr":
        return {t.seed: t for t in cell.repeats if t.seed is not None}
    if s.lr is not None:
        return {t.seed: t for t in done if math.isclose(t.lr, s.lr, rel_tol=1e-6)}
    return {t.seed: t for t in [*done, *cell.repeats] if t.seed is not None}


def grad_ratio(t: TrialResult) -> float:
    """log10 of the first hidden layer's mean weight-gradient norm over the output layer's (diagnostics)."""
    norms: dict[str, list[float]] = {}
    for r in t.diagnostics or []:
        if r.get("point", "act_in") == "act_in" and math.isfinite(float(r["grad_norm"])):
            norms.setdefault(str(r["layer"]), []).append(float(r["grad_norm"]))
    hidden = sorted((k for k in norms if k != "out"), key=layer_index)
    if not hidden or "out" not in norms:
        return math.nan
    first, out = (sum(norms[k]) / len(norms[k]) for k in (hidden[0], "out"))
    return math.log10(first / out) if first > 0 and out > 0 else math.nan


def value(t: TrialResult, metric: str) -> Any:
    if metric == "epochs_to_converge":
        e, c = t.metrics.get("epochs_to_converge", math.nan), t.metrics.get("converged")
        return (float(e), bool(c)) if math.isfinite(e) and c is not None else None
    if metric == "s_per_epoch":
        v = t.metrics.get("s_per_epoch", math.nan)
        return math.log(v) if v > 0 else math.nan
    if metric == "grad_ratio":
        return grad_ratio(t)
    return t.value(metric)


def basin_values(cell: CellResult, metric: str) -> dict[int, float]:
    out = {}
    for seed, b in cell.basin.brackets.items():
        if b is None:
            continue
        if metric == "basin_width" and b.closed:
            out[seed] = b.width
        elif metric == "basin_upper" and not b.upper_open:
            out[seed] = math.log10(math.sqrt(b.upper_lo * b.upper_hi))
    return out


def arm_values(cell: CellResult, s: Setting, metric: str) -> dict[int, Any]:
    if metric in LATTICE:
        return basin_values(cell, metric)
    vals = {seed: value(t, metric) for seed, t in samples(cell, s).items()}
    return {k: v for k, v in vals.items() if v is not None and (isinstance(v, tuple) or math.isfinite(v))}


# ---------------------------------------------------------------------- one row


def _mean(vals: Sequence[float]) -> float:
    return sum(vals) / len(vals) if vals else math.nan


def run_test(claim: Claim, diffs: Sequence[float], lattice: float) -> Test:
    """The claim's test on paired differences; a ratio metric's margin (±5%) is taken in log space."""
    if claim.metric in RATIO and claim.test != "superiority":  # a ratio within ±5%: log(1.05) on log ratios
        t = run_test(replace(claim, metric="", margin=math.log(1 + claim.margin)), diffs, lattice)
        return replace(t, method=t.method.replace(f"{math.log(1 + claim.margin):g}", f"{claim.margin:.0%} in ratio"))
    if claim.test == "non_inferiority":
        return non_inferiority(diffs, claim.margin)
    if claim.test == "equivalence":
        return equivalence(diffs, claim.margin)
    return superiority(diffs, claim.expect, lattice)


def measure(claim: Claim, s: Setting, studies: Mapping[str, Study],
            latency: Mapping[tuple[str, str, str], list[float]] | None = None) -> Row:
    """One claims row: the setting's paired values, its test, and (before correction) no verdict yet."""
    claim = claim.of(s)
    row = Row(claim, s)
    arms = [a for a in (s.first, s.second, s.base_first, s.base_second) if a is not None]
    if claim.metric == "latency":
        if not latency:
            row.note = "not measured: bnsweep claims measures it"
            return row
        vals = [dict(enumerate(latency.get(tuple(v for _, v in a.cell), []))) for a in arms]
        resolution = 0.0
    else:
        missing = [a for a in arms if a.study not in studies or studies[a.study].cell(a) is None]
        if missing:
            a = missing[0]
            row.note = (f"needs the sweep {a.study} (bnsweep claims runs it)" if a.study not in studies else
                        f"the sweep {a.study} has no cell {a.label}")
            return row
        cells = [studies[a.study].cell(a) for a in arms]
        if claim.metric in POINTS:
            point, layer = POINTS[claim.metric]
            why = [f"{c.name}: {w}" for c in cells if (w := normalized_by_construction(point, layer, bn_of(c)))]
            if why:
                row.construction = "; ".join(why)
                row.note = f"not evidence: normalized by construction ({row.construction})"
                return row
        vals = [arm_values(c, s, claim.metric) for c in cells]
        resolution = max((c.resolution for c in cells), default=0.0) if claim.metric in LATTICE else 0.0
    seeds = sorted(set.intersection(*(set(v) for v in vals)))
    if claim.metric == "s_per_epoch":  # a population member's time is its share: compare at equal K only
        pops = [{k: t.population for k, t in samples(c, s).items()} for c in cells]
        seeds = [k for k in seeds if len({p.get(k) for p in pops}) == 1]
    if claim.metric == "epochs_to_converge":
        a, b = [vals[0][k] for k in seeds], [vals[1][k] for k in seeds]
        check = _check_spacing(studies, s)
        row.test = censored_pairs(a, b, claim.expect, check)
        row.first = _mean([e for e, r in a if r]) if a else math.nan
        row.second = _mean([e for e, r in b if r]) if b else math.nan
    else:
        if len(vals) == 4:
            diffs = [(vals[0][k] - vals[1][k]) - (vals[2][k] - vals[3][k]) for k in seeds]
            row.first = _mean([vals[0][k] - vals[1][k] for k in seeds])
            row.second = _mean([vals[2][k] - vals[3][k] for k in seeds])
        elif len(vals) == 2:
            diffs = [vals[0][k] - vals[1][k] for k in seeds]
            row.first, row.second = _mean([vals[0][k] for k in seeds]), _mean([vals[1][k] for k in seeds])
        else:
            diffs = [vals[0][k] for k in seeds]
            row.first = _mean(diffs)
        if claim.metric in RATIO:  # compared as log ratios; the arms' means as seconds / milliseconds
            row.first, row.second = math.exp(row.first), math.exp(row.second)
        row.test = run_test(claim, diffs, resolution)
    if row.test.iv.n < 2:
        row.note = f"{row.test.iv.n} paired seed{'s' * (row.test.iv.n != 1)}: no verdict from fewer than 2"
    return row


def _check_spacing(studies: Mapping[str, Study], s: Setting) -> float:
    """Epochs between validation checks (the lattice epochs to target lie on), from a trial's val_epoch."""
    cell = studies[s.first.study].cell(s.first)
    for t in [*(cell.repeats if cell else []), *(cell.trials if cell else [])]:
        e = sorted(set(t.val_epoch))
        if len(e) >= 2:
            return min(b - a for a, b in zip(e, e[1:], strict=False) if b > a)
    return 0.0


# ---------------------------------------------------------------------- all rows, corrected


def claim_rows(studies: Mapping[str, Study], claims: Sequence[Claim] = CLAIMS,
               latency: Mapping[tuple[str, str, str], list[float]] | None = None) -> list[Row]:
    """Every (claim, setting) row, with Holm's correction over each claim's tested rows of one protocol."""
    rows = [measure(c, s, studies, latency) for c in claims for s in c.settings]
    families: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.tested:
            families.setdefault((r.claim.id, r.setting.protocol), []).append(r)
    for family in families.values():
        for r, p in zip(family, holm([r.test.p for r in family]), strict=True):
            r.p_adjusted = p
            r.verdict = decide(r.test, p)
    return rows


# ---------------------------------------------------------------------- as text and CSV


def show(metric: str, iv_est: float, lo: float, hi: float, n: int) -> str:
    """The effect as a researcher reads it: pp for accuracies, x for ratios, with digits its interval allows."""
    iv = Interval(iv_est, lo, hi, n)
    if metric in RATIO:
        return fit_digits(Interval(math.exp(iv_est), math.exp(lo), math.exp(hi), n), signed=False, unit="x")
    scale, unit = SCALE.get(metric, (1.0, UNITS.get(metric, "")))
    return fit_digits(iv, scale, unit=unit)


def effect_text(r: Row) -> str:
    if r.test is None:
        return "-"
    iv = r.test.iv
    return f"{show(r.claim.metric, iv.estimate, iv.low, iv.high, iv.n)}, n={iv.n}"


def arm_text(metric: str, v: float) -> str:
    if not math.isfinite(v):
        return "-"
    if metric == "basin_upper":  # log10 of the upper edge's LR: say the rate
        return f"lr {10 ** v:.2g}"
    if metric in RATIO:
        return f"{v:.3g} {'ms' if metric == 'latency' else 's'}"
    scale, unit = SCALE.get(metric, (1.0, UNITS.get(metric, "")))
    return f"{v * scale:.3g}{'%' if unit == ' pp' else unit}"


def csv_row(r: Row) -> dict[str, Any]:
    iv = r.test.iv if r.test else None
    ratio = r.claim.metric in RATIO and iv is not None
    conv = (lambda v: math.exp(v)) if ratio else (lambda v: v)  # noqa: E731
    p = (f"p={r.test.p:.3g}, Holm p={r.p_adjusted:.3g} ({r.test.method}" + (f"; {r.test.note}" if r.test.note else "")
         + "). ") if r.tested else ""
    if r.tested and r.verdict == "not_resolved" and r.test.method.startswith(("exact", "paired sign")):
        n = r.test.pairs or iv.n
        p += f"With {n} pairs an exact test cannot give p below {2 / 2 ** n:.2g}. "
    return {"claim_id": r.claim.id, "claim": r.claim.claim, "seed": r.claim.seed, "protocol": r.setting.protocol,
            "setting": r.setting.name, "metric": r.claim.metric, "first": r.first, "second": r.second,
            "diff": conv(iv.estimate) if iv else math.nan, "lo": conv(iv.low) if iv else math.nan,
            "hi": conv(iv.high) if iv else math.nan, "n": iv.n if iv else 0, "verdict": r.verdict,
            "resolvable": iv.half_width if iv else math.nan,
            "seed_value": SEED_VALUES.get(r.claim.id, "") if r.setting.protocol == "as_stated" else "",
            "note": (p + (r.note or f"why this setting: {r.setting.why}")).strip()}


def summary(rows: Sequence[Row], claims: Sequence[Claim] = CLAIMS) -> list[dict[str, Any]]:
    """One line per claim: its as-stated verdict, and how it fares across its other settings."""
    out = []
    for c in claims:
        mine = [r for r in rows if r.claim.id == c.id]
        stated = [r for r in mine if r.setting.protocol == "as_stated"]
        others = [r for r in mine if r.setting.protocol != "as_stated" and not r.construction]
        flagged = [r for r in mine if r.construction]
        counts = {v: [r for r in others if r.verdict == v] for v in ("supported", "contradicted", "not_resolved")}
        out.append({"claim_id": c.id, "as_stated": stated[0].verdict if stated else "not_resolved",
                    "settings": len(others), "supported": len(counts["supported"]),
                    "contradicted": len(counts["contradicted"]), "not_resolved": len(counts["not_resolved"]),
                    "overall": overall(stated, others, counts, flagged)})
    return out


def short(r: Row) -> str:
    name = r.setting.name.split(",")[0] if r.setting.name[0].islower() else r.setting.name.split(":")[0]
    comp = r.setting.name.rsplit(": ", 1)[-1]
    return f"{name} {comp} ({r.setting.protocol})" if comp != name else f"{name} ({r.setting.protocol})"


def overall(stated: Sequence[Row], others: Sequence[Row], counts: Mapping[str, Sequence[Row]],
            flagged: Sequence[Row]) -> str:
    parts = [f"holds in {len(counts['supported'])} of {len(others)} settings"]
    if counts["contradicted"]:
        parts.append("reversed in " + "; ".join(short(r) for r in counts["contradicted"]))
    if counts["not_resolved"]:
        parts.append(f"not resolved in {len(counts['not_resolved'])}")
    if flagged:
        parts.append(f"no evidence possible in {len(flagged)} (normalized by construction)")
    return "; ".join(parts)

