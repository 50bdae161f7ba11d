"""The seeds' claims (/work/shared/seeds, summarized in CLAIMS), each tested on a study, with a verdict.

A claim names the study (a sweep, normally one of conf/sweep/claims_*.yaml that ``bnsweep claims`` runs),
the metric, the two BN variants compared and the sign the claim predicts. The measured effect is the
report's own interval (paired by seed over the repeats, or the basin comparison), so the Claims section and
the Answers never disagree. Verdict: ``supported`` (the interval excludes 0 on the predicted side),
``contradicted`` (on the other side), else ``not resolved`` with the smallest difference it could resolve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bnsweep.report.basins import basin_diff
from bnsweep.report.render import Document
from bnsweep.report.results import CellResult, Layout
from bnsweep.report.stats import Interval, mean_ci, paired_diff

CLAIM_COLUMNS = ["claim", "seed", "study", "metric", "group", "first", "second", "diff", "lo", "hi", "n",
                 "verdict", "resolvable", "note"]


@dataclass(frozen=True)
class Claim:
    """One claim and how it is tested.

    how: ``diff`` first - second per group (one row per group); ``within`` the metric itself in ``first``
    cells (vs 0); ``interaction`` (first - second in ``groups[1]``) - (first - second in ``groups[0]``),
    paired by seed. expect: +1 / -1 the sign the claim predicts; 0 "no difference": supported when the whole
    interval lies within ±``margin``.
    """

    claim: str
    seed: str
    study: str
    metric: str
    first: str
    second: str = ""
    expect: int = 1
    how: str = "diff"
    groups: tuple[str, ...] = ()
    margin: float = 0.0
    note: str = ""


CLAIMS = [
    Claim("BN raises accuracy (91% → 93%)", "001", "claims_bn", "test_acc", "before_act", "none", +1,
          note="test acc at each cell's best LR, sigmoid MLP"),
    Claim("BN converges in fewer epochs", "001", "claims_bn", "epochs_to_converge", "before_act", "none", -1,
          note="epochs to the sweep's target val acc (a run that never got there counts budget + 1)"),
    Claim("BN costs time per epoch (48 s → 69 s)", "001", "claims_bn", "s_per_epoch", "before_act", "none", +1,
          note="seconds per epoch; workers share the CPU, so comparable within the sweep only"),
    Claim("BN allows larger learning rates, widens the usable LR range, eases the search", "002, 004",
          "claims_bn", "basin", "before_act", "none", +1,
          note="LR-basin width in decades (LRs whose run reached the target); a bracket per LR-search seed"),
    Claim("BN keeps pre-activations away from sigmoid's flat tails (less saturation)", "000", "claims_bn",
          "preact_extent", "before_act", "none", -1,
          note="max(|p15|, |p85|) of the activation's input, last half of training (sigmoid is flat beyond ~4)"),
    Claim("BN reduces the drift of a layer's input distribution during training", "000, 001", "claims_bn",
          "preact_drift", "before_act", "none", -1,
          note="start-to-end change of the activation input's median and spread, per first spread"),
    Claim("BN after the activation is better than before it ('always use it after')", "001", "claims_bn",
          "test_acc", "after_act", "before_act", +1, note="seeds 002-004: either place works; 004: before is usual"),
    Claim("BN has a small regularizing effect (smaller train-test gap)", "002, 004", "claims_bn",
          "train_test_gap", "before_act", "none", -1, note="last epoch's train acc minus test acc"),
    Claim("Running averages serve inference as well as population statistics", "002, 003", "claims_bn",
          "precise_bn_gain", "before_act", expect=0, how="within", margin=0.005,
          note="test acc with population statistics minus with running averages; supported within ±0.5 pp"),
    Claim("BN makes the network less sensitive to weight initialization", "002", "claims_init", "test_acc",
          "before_act", "none", +1, how="interaction", groups=("init=he_normal", "init=normal"),
          note="BN's test-acc gain under normal(std 1) minus its gain under he_normal, paired by seed"),
    Claim("BN works with SGD, momentum, Adam and RMSprop", "004", "claims_optimizers", "test_acc", "before_act",
          "none", +1, note="per optimizer; contradicted = BN lowers test acc with it"),
]


@dataclass
class Study:
    """What a claim needs of one sweep: its collected cells and their layout."""

    cells: Sequence[CellResult]
    layout: Layout


def _cell(study: Study, group: str, row: str) -> CellResult | None:
    return next((c for c in study.cells if study.layout.group(c) == group and c.labels[study.layout.row] == row),
                None)


def _diff(a: CellResult, b: CellResult, metric: str) -> Interval:
    if metric == "basin":
        return basin_diff(a.basin, b.basin)
    return paired_diff(a.repeat_values(metric), b.repeat_values(metric))


def verdict(iv: Interval, claim: Claim) -> str:
    if claim.expect == 0:
        if iv.n >= 2 and math.isfinite(iv.half_width) and -claim.margin < iv.low and iv.high < claim.margin:
            return "supported"
        return "contradicted" if iv.sign and abs(iv.estimate) > claim.margin else "not resolved"
    return {claim.expect: "supported", -claim.expect: "contradicted"}.get(iv.sign, "not resolved")


def measure(claim: Claim, study: Study) -> list[tuple[str, Interval]]:
    """(group, interval) the claim is tested on: one per group for ``diff``; one for the other kinds."""
    if claim.how == "within":
        return [(g, mean_ci(list(c.repeat_values(claim.metric).values())))
                for g in study.layout.groups if (c := _cell(study, g, claim.first))]
    if claim.how == "interaction":
        ga, gb = claim.groups
        cells = [_cell(study, g, r) for g in (ga, gb) for r in (claim.first, claim.second)]
        if None in cells:
            return []
        a1, a2, b1, b2 = (c.repeat_values(claim.metric) for c in cells)
        seeds = set(a1) & set(a2) & set(b1) & set(b2)
        return [(f"{gb} vs {ga}", mean_ci([(b1[s] - b2[s]) - (a1[s] - a2[s]) for s in seeds]))]
    out = []
    for g in study.layout.groups:
        a, b = _cell(study, g, claim.first), _cell(study, g, claim.second)
        if a and b:
            out.append((g, _diff(a, b, claim.metric)))
    return out


def claim_rows(studies: Mapping[str, Study], claims: Sequence[Claim] = CLAIMS) -> list[dict[str, Any]]:
    """One row per claim (per group where the claim is tested group by group); a claim whose study is
    missing says what would be needed."""
    rows = []
    for claim in claims:
        base = {"claim": claim.claim, "seed": claim.seed, "study": claim.study, "metric": claim.metric,
                "first": claim.first, "second": claim.second}
        measured = measure(claim, studies[claim.study]) if claim.study in studies else []
        if not measured:
            need = (f"needs the sweep {claim.study} (bnsweep claims runs it)" if claim.study not in studies else
                    f"the sweep {claim.study} has no cells {claim.first!r}/{claim.second!r} to compare")
            rows.append(base | {"group": "", "diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0,
                                "verdict": "not resolved", "resolvable": math.nan, "note": need})
            continue
        for group, iv in measured:
            rows.append(base | {"group": group, "diff": iv.estimate, "lo": iv.low, "hi": iv.high, "n": iv.n,
                                "verdict": verdict(iv, claim), "resolvable": iv.half_width, "note": claim.note})
    return rows


def _fmt(v: float, scale: float) -> str:
    return "-" if not math.isfinite(v) else f"{v * scale:+.3g}"


def section(doc: Document, rows: Sequence[dict[str, Any]]) -> None:
    """The Claims section: a table, then what each verdict rests on."""
    doc.heading("Claims")
    doc.para("Each claim of the seeds, tested: first minus second at each cell's best LR, paired by seed over the "
             "repeats (the LR basin: by its brackets). Accuracies in percentage points (pp). *supported*: the 95% "
             "interval excludes 0 on the side the claim predicts; *contradicted*: on the other side; *not "
             "resolved*: it includes 0, and differences smaller than the ± shown cannot be told apart with this "
             "data.")
    table = []
    for r in rows:
        scale = 100.0 if r["metric"] in ("test_acc", "best_val_acc", "train_test_gap", "precise_bn_gain") else 1.0
        unit = " pp" if scale == 100.0 else ""
        est = ("-" if not math.isfinite(r["diff"]) else
               f"{_fmt(r['diff'], scale)}{unit} [{_fmt(r['lo'], scale)}, {_fmt(r['hi'], scale)}], n={r['n']}")
        verdict_text = r["verdict"]
        if verdict_text == "not resolved" and r["resolvable"] == 0:
            verdict_text += " (the same on every seed)"
        elif verdict_text == "not resolved" and math.isfinite(r["resolvable"]):
            verdict_text += f" (< ±{abs(r['resolvable']) * scale:.2g}{unit})"
        elif verdict_text == "not resolved" and r["n"]:
            verdict_text += " (an edge is open)" if r["metric"] == "basin" else " (no interval)"
        table.append([r["claim"], r["seed"], f"{r['study']}: {r['group'] or '-'}",
                      f"{r['metric']}: {r['first']}{' − ' + r['second'] if r['second'] else ''}", est,
                      f"**{verdict_text}**", r["note"]])
    doc.table(["claim", "seed", "study: group", "metric: first − second", "effect [95% interval]", "verdict",
               "how / what is needed"], table, numeric_from=99)
