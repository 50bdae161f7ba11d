"""reports/claims/: claims.md and .html (what held where, then every row), claims.csv, claims_summary.csv."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bnsweep.report.export import write_csv
from bnsweep.report.registry import CLAIM_COLUMNS, CLAIMS, SUMMARY_COLUMNS, Claim
from bnsweep.report.render import Document
from bnsweep.report.seeds import NOTES, SEED_VALUES
from bnsweep.report.verdicts import Row, arm_text, csv_row, effect_text, summary

WORDS = {"supported": "supported", "contradicted": "contradicted", "not_resolved": "not resolved"}


def headline(c: Claim, rows: Sequence[Row], line: dict[str, Any]) -> str:
    """One sentence a researcher can quote: the claim, as stated, then across settings."""
    stated = next((r for r in rows if r.setting.protocol == "as_stated"), None)
    if stated is None:
        head = "not tested as stated"
    elif stated.test is None and not stated.construction:
        head = f"as stated **not resolved** ({stated.note})"
    elif stated.construction:
        head = "as stated, no evidence possible (the metric is BN's own output there)"
    else:
        ours = ""
        if stated.setting.second is not None and stated.setting.base_first is None and math.isfinite(
                stated.first) and math.isfinite(stated.second):
            ours = f"; ours {arm_text(c.metric, stated.second)} → {arm_text(c.metric, stated.first)}"
        seed = f"; the seed: {SEED_VALUES[c.id]}" if c.id in SEED_VALUES else ""
        head = f"as stated **{WORDS[stated.verdict]}** ({effect_text(stated)}{ours}{seed})"
    return f"**{c.claim}** (seed {c.seed}): {head}; across settings it {line['overall']}."


def write(out: Path, rows: Sequence[Row], sweeps: Sequence[str], elapsed_s: float | None = None) -> list[Path]:
    """Write the claims report; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    lines = summary(rows)
    doc = Document("The seeds' claims, tested where they were made and where they could fail")
    doc.para("What held where (verdicts after Holm's correction over each claim's rows of one protocol; a claim "
             "holds in a setting when its test rejects 'no effect' on the side it predicts):")
    doc.bullets([headline(c, [r for r in rows if r.claim.id == c.id], line)
                 for c, line in zip(CLAIMS, lines, strict=True)])
    doc.heading("Summary")
    doc.table(["claim", "as stated", "overall", "settings", "supported", "contradicted", "not resolved"],
              [[c.claim, WORDS[x["as_stated"]], x["overall"], str(x["settings"]), str(x["supported"]),
                str(x["contradicted"]), str(x["not_resolved"])] for c, x in zip(CLAIMS, lines, strict=True)],
              numeric_from=3)
    doc.heading("How each claim is tested")
    doc.bullets([
        "**as_stated**: the seed's own setting (every key its note states: model, activation, init, optimizer, LR, "
        "batch, epochs, data, BN position and input BN), at the seed's LR or Keras's default where the note has "
        "none. **fixed_lr**: both cells at one shared LR, paired by training seed. **tuned_lr**: each cell at its "
        "own best LR (repeats with fresh seeds), paired by seed; LR-basin claims use the LR search itself.",
        "Tests: accuracies, gaps, saturation, drift, gradient ratios: paired t-test. s/epoch and latency: paired "
        "t-test of log ratios, shown as ratios. Basin edges and widths lie on the search's 0.25-decade lattice: "
        "an exact sign-flip permutation test (n seeds can never give p < 2/2^n), interval at least one step wide. "
        "Epochs to target: censored where a run never reached the target, so a paired sign test on the orderings "
        "censoring allows (never an average of budget + 1), with the fraction that reached it. 'Works with X' "
        "and 'input BN replaces standardizing' are non-inferiority tests (margin 0.5 pp); 'no difference' "
        "claims are equivalence tests (TOST) with the margin named in the row.",
        "Multiple comparisons: Holm's step-down correction over each claim's rows under one protocol; a row is "
        "supported / contradicted when its corrected p < 0.05 on that side, else not resolved. Intervals are "
        "95% and uncorrected; p-values are in claims.csv's note.",
        "Saturation is read at the activation's input and drift at the hidden Linear outputs of layers 2+; where "
        "that point is BN's own output in a compared cell (BN before the activation, for saturation) the row "
        "states it and gives no verdict: such a value is normalized by definition. The train-test gap uses "
        "eval-mode accuracy on a fixed training subset, not the noisy running train accuracy. Time ratios "
        "compare networks trained one at a time (population size 1) on both sides.",
    ])
    doc.heading("The seeds' settings")
    doc.table(["seed", "note", "what it states", "what it leaves open (our choice)"],
              [[n.seed, n.source, ", ".join(f"{k}={v}" for k, v in {**n.stated, **n.bn}.items()), n.open]
               for n in NOTES.values()], numeric_from=99)
    doc.heading("Every row")
    for c in CLAIMS:
        mine = [r for r in rows if r.claim.id == c.id]
        doc.heading(f"{c.claim} ({c.id}, seed {c.seed})", 3)
        doc.para(f"Metric: {c.how}.")
        table = []
        for r in mine:
            verdict = "—" if r.construction else WORDS[r.verdict]
            p = f"{r.p_adjusted:.2g}" if r.tested else "-"
            if r.setting.base_first is not None:  # an interaction: first and second are BN's gains
                first, second = (f"{v * 100:+.3g} pp" if math.isfinite(v) else "-" for v in (r.first, r.second))
            elif r.setting.second is not None:
                first, second = arm_text(c.metric, r.first), arm_text(c.metric, r.second)
            else:
                first, second = arm_text(c.metric, r.first), "-"
            table.append([r.setting.protocol, r.setting.name, first, second, effect_text(r), p,
                          f"**{verdict}**", r.note or r.setting.why])
        doc.table(["protocol", "setting", "first", "second", "effect [95% CI]", "Holm p", "verdict", "note"],
                  table, numeric_from=99)
    timing = f" in {elapsed_s:.0f} s" if elapsed_s is not None else ""
    doc.para(f"Sweeps: {', '.join(f'`{n}`' for n in sweeps)} (conf/sweep/claims_*.yaml){timing}; each sweep's "
             f"own report is in reports/<sweep>/. Re-running `bnsweep claims` re-uses every finished trial.")
    files = [out / "claims.md", out / "claims.html"]
    files[0].write_text(doc.to_markdown())
    files[1].write_text(doc.to_html())
    files.append(write_csv(out / "claims.csv", CLAIM_COLUMNS, [csv_row(r) for r in rows]))
    files.append(write_csv(out / "claims_summary.csv", SUMMARY_COLUMNS, lines))
    return files
