"""The report's figures (matplotlib, Agg): one function per figure, each writes one PNG and returns its path.

Cells are laid out the same way in every figure: a row per BN variant (the first gridded BN key),
a column per *group* (the combination of the other gridded keys, e.g. ``activation=relu``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from bnsweep.report.results import CellResult, Comparison, Layout  # noqa: E402
from bnsweep.stats import mean_ci  # noqa: E402

DPI = 100
COLORS = plt.get_cmap("tab10").colors


def _save(fig: plt.Figure, path: Path, dpi: int, tight: bool = False) -> Path:
    # Our figures use constrained layout, which fits everything in one draw; "tight" draws twice.
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return path


def _panels(n_rows: int, n_cols: int, w: float = 3.3, h: float = 2.5, **kw) -> tuple[plt.Figure, np.ndarray]:
    return plt.subplots(n_rows, n_cols, figsize=(w * n_cols + 0.6, h * n_rows + 0.6), squeeze=False,
                        layout="constrained", **kw)


def _color(layout: Layout, row: str) -> tuple:
    return COLORS[layout.rows.index(row) % len(COLORS)]


# ---------------------------------------------------------------------- accuracy over the grid


def heatmaps(cells: Sequence[CellResult], layout: Layout, path: Path, dpi: int = DPI) -> Path:
    """Best val and test accuracy (LR search) per cell: BN variant x column key, one row per facet."""
    cols = layout.col_values or [""]
    fig, axes = _panels(len(layout.facets), 2, w=max(3.2, 1.05 * len(cols) + 1.6), h=0.55 * len(layout.rows) + 1.3)
    for f, facet in enumerate(layout.facets):
        for j, (key, title) in enumerate((("best_val_acc", "best val acc"), ("test_acc", "test acc at best LR"))):
            ax = axes[f, j]
            m = np.full((len(layout.rows), len(cols)), np.nan)
            for c in cells:
                if layout.facet_of(c) == facet:
                    m[layout.rows.index(c.labels[layout.row]), cols.index(layout.col_of(c))] = c.row[key]
            finite = m[np.isfinite(m)]
            lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
            ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=lo - 1e-9, vmax=hi + 1e-9, aspect="auto")
            for (r, k), v in np.ndenumerate(m):
                txt = "-" if math.isnan(v) else f"{v:.3f}"
                light = not math.isnan(v) and v < lo + 0.6 * (hi - lo)
                ax.text(k, r, txt, ha="center", va="center", fontsize=9, color="white" if light else "black")
            ax.set_xticks(range(len(cols)), cols, rotation=30 if len(cols) > 4 else 0)
            ax.set_yticks(range(len(layout.rows)), layout.rows)
            ax.set_xlabel(layout.col or "")
            ax.set_ylabel(layout.row if j == 0 else "")
            ax.set_title(title + (f"  ({facet})" if facet else ""), fontsize=10)
    return _save(fig, path, dpi)


def lr_curves(cells: Sequence[CellResult], layout: Layout, target: float, search_range: tuple[float, float],
              path: Path, dpi: int = DPI) -> Path:
    """Best val acc of every LR-search trial against its LR (log-x), the target, the LR basin shaded."""
    fig, axes = _panels(len(layout.rows), len(layout.groups), sharex=True, sharey=True)
    for c in cells:
        ax = axes[layout.rows.index(c.labels[layout.row]), layout.groups.index(layout.group(c))]
        pts = sorted((t.lr, t.metrics.get("best_val_acc", math.nan), t.state) for t in c.trials
                     if t.metrics and t.lr > 0)
        color = _color(layout, c.labels[layout.row])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color, alpha=0.5, lw=1)
        for state, marker in (("complete", "o"), ("pruned", "v"), ("diverged", "x")):
            sel = [p for p in pts if p[2] == state]
            if sel:
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, color=color, s=22, zorder=3)
        reps = [(t.lr, t.metrics.get("best_val_acc", math.nan)) for t in c.repeats if t.metrics]
        if reps:
            ax.scatter(*zip(*reps, strict=True), marker=".", color="black", s=18, zorder=4)
        b = c.basin.main
        if b is not None:  # the reached span solid, each edge's bracket lighter
            ax.axvspan(b.lower_hi / 1.06, b.upper_lo * 1.06, color="tab:green", alpha=0.15, lw=0)
            for lo, hi in ((b.lower_lo, b.lower_hi), (b.upper_lo, b.upper_hi)):
                ax.axvspan(lo, hi, color="tab:green", alpha=0.06, lw=0)
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        if all(math.isfinite(x) and x > 0 for x in search_range):
            ax.set_xlim(search_range[0] / 1.3, search_range[1] * 1.3)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{c.labels[layout.row]} | {layout.group(c)}\nbasin {c.basin.describe()}", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("learning rate")
    for ax in axes[:, 0]:
        ax.set_ylabel("best val acc")
    shown = {t.state for c in cells for t in c.trials} | ({"repeats"} if any(c.repeats for c in cells) else set())
    handles = [Line2D([], [], ls="", marker=m, color="gray" if k != "repeats" else "black", label=k)
               for k, m in (("complete", "o"), ("pruned", "v"), ("diverged", "x"), ("repeats", ".")) if k in shown]
    handles.append(Patch(color="tab:green", alpha=0.15, label="LR basin"))
    fig.legend(handles=handles, loc="outside upper right", fontsize=8, ncol=len(handles))
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------- the best LR, repeated


def learning_curves(cells: Sequence[CellResult], layout: Layout, target: float, path: Path, dpi: int = DPI) -> Path:
    """val_acc per (fractional) epoch at each cell's best LR: every repeat thin, their mean bold; a panel per group."""
    fig, axes = _panels(1, len(layout.groups), sharey=True)
    for c in cells:
        ax = axes[0, layout.groups.index(layout.group(c))]
        runs = [t for t in c.repeats if t.val_acc] or ([c.best] if c.best and c.best.val_acc else [])
        if not runs:
            continue
        color = _color(layout, c.labels[layout.row])
        for t in runs:  # checks at the same steps in every repeat (same val_every, data)
            ax.plot(t.epochs, t.val_acc, color=color, alpha=0.3, lw=0.8, marker="." if len(t.val_acc) < 3 else None)
        longest = max(runs, key=lambda t: len(t.val_acc))
        n = len(longest.val_acc)
        mean = [np.mean([t.val_acc[e] for t in runs if len(t.val_acc) > e]) for e in range(n)]
        ax.plot(longest.epochs, mean, color=color, lw=2, marker="o", ms=3,
                label=f"{c.labels[layout.row]} ({len(runs)} run{'s' * (len(runs) > 1)})")
    for j, g in enumerate(layout.groups):
        ax = axes[0, j]
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set_title(g, fontsize=10)
        ax.set_xlabel("epoch (samples seen / training images)")
        ax.legend(fontsize=8, loc="lower right")
    axes[0, 0].set_ylabel("val acc (best LR)")
    return _save(fig, path, dpi)


def _bars(ax: plt.Axes, cells: Sequence[CellResult], layout: Layout, key: str) -> None:
    width = 0.8 / max(len(layout.rows), 1)
    for c in cells:
        vals = list(c.repeat_values(key).values()) or ([c.best_value(key)] if c.best else [])
        iv = mean_ci(vals)
        if math.isnan(iv.estimate):
            continue
        i, g = layout.rows.index(c.labels[layout.row]), layout.groups.index(layout.group(c))
        x = g - 0.4 + width * (i + 0.5)
        err = None if math.isnan(iv.low) else [[iv.estimate - iv.low], [iv.high - iv.estimate]]
        ax.bar(x, iv.estimate, width * 0.9, color=_color(layout, c.labels[layout.row]), yerr=err, capsize=3,
               label=c.labels[layout.row])
    ax.set_xticks(range(len(layout.groups)), layout.groups, rotation=30 if len(layout.groups) > 4 else 0)


def epochs_and_time(cells: Sequence[CellResult], layout: Layout, target: float, path: Path, dpi: int = DPI) -> Path:
    """Epochs to target, seconds per epoch and their product side by side (mean and 95% CI of the repeats)."""
    fig, axes = _panels(1, 3, w=max(3.6, 0.9 * len(layout.groups) + 2))
    titles = (("epochs_to_converge", f"epochs to val acc {target:g}"), ("s_per_epoch", "seconds per epoch"),
              ("time_to_target", "time to target (s)"))
    for ax, (key, title) in zip(axes[0], titles, strict=True):
        _bars(ax, cells, layout, key)
        ax.set_title(title, fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    fig.legend(seen.values(), seen.keys(), loc="outside upper right", fontsize=8, ncol=len(seen))
    return _save(fig, path, dpi)


def effects(comparisons: Sequence[Comparison], metrics: Sequence[tuple[str, str]], path: Path,
            dpi: int = DPI) -> Path:
    """Paired differences with their intervals (a forest plot); an interval clear of 0 is drawn solid."""
    fig, axes = _panels(1, len(metrics), w=3.0, h=0.42 * len(comparisons) + 1.0, sharey=True)
    labels = [f"{c.group}: {c.a_label} - {c.b_label}" for c in comparisons]
    for ax, (key, title) in zip(axes[0], metrics, strict=True):
        for y, comp in enumerate(comparisons):
            iv = comp.deltas[key]
            if math.isnan(iv.estimate):
                continue
            resolved = comp.verdicts.get(key, "not_resolved") != "not_resolved"
            color = "tab:blue" if resolved else "tab:gray"
            if math.isfinite(iv.low) and math.isfinite(iv.high):
                ax.plot([iv.low, iv.high], [y, y], color=color, lw=2.5 if resolved else 1.2,
                        ls="-" if iv.kind.endswith("CI") else ":")
            ax.plot(iv.estimate, y, "o", color=color, ms=5)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
    axes[0, 0].set_yticks(range(len(labels)), labels)
    axes[0, 0].invert_yaxis()
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------- Optuna's views


def importance_and_slice(study, path_imp: Path, path_slice: Path, dpi: int = DPI) -> tuple[list[Path], str]:
    """Optuna's parameter-importance and slice plots over all cells' trials; a note where one fails."""
    from optuna.visualization import matplotlib as ovm

    made, notes = [], []
    for path, plot in ((path_imp, ovm.plot_param_importances), (path_slice, ovm.plot_slice)):
        try:
            with warnings.catch_warnings(), plt.style.context("ggplot"):  # optuna sets ggplot globally
                warnings.simplefilter("ignore")
                ax = plot(study)
            first = ax.flat[0] if isinstance(ax, np.ndarray) else ax
            made.append(_save(first.figure, path, dpi, tight=True))
        except Exception as e:  # e.g. too few completed trials for an importance estimate
            plt.close("all")
            notes.append(f"{plot.__name__} could not be drawn: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return made, "; ".join(notes)


# ---------------------------------------------------------------------- diagnostics


def diagnostics(cells: Sequence[CellResult], layout: Layout, path_pre: Path, path_grad: Path,
                dpi: int = DPI) -> list[Path]:
    """Per-layer pre-activation percentiles (15/50/85) and weight-gradient norms over training steps."""
    with_diag = [c for c in cells if c.diagnostics]
    if not with_diag:
        return []
    out = []
    for path, kind in ((path_pre, "pre"), (path_grad, "grad")):
        fig, axes = _panels(len(layout.rows), len(layout.groups), sharex=True, sharey=kind == "grad")
        for c in with_diag:
            ax = axes[layout.rows.index(c.labels[layout.row]), layout.groups.index(layout.group(c))]
            diag = [r for r in c.diagnostics if r.get("point", "act_in") == "act_in"]  # one row per (step, layer)
            layers = list(dict.fromkeys(r["layer"] for r in diag))
            for k, layer in enumerate(layers):
                rows = [r for r in diag if r["layer"] == layer]
                steps = [r["step"] for r in rows]
                color = COLORS[k % len(COLORS)]
                if kind == "pre":
                    if all(math.isnan(r["p50"]) for r in rows):
                        continue  # the logits layer has no activation
                    ax.fill_between(steps, [r["p15"] for r in rows], [r["p85"] for r in rows], color=color,
                                    alpha=0.25, lw=0)
                    ax.plot(steps, [r["p50"] for r in rows], color=color, lw=1.2, label=layer)
                else:
                    ax.plot(steps, [r["grad_norm"] for r in rows], color=color, lw=1.2, label=layer)
            if kind == "grad":
                ax.set_yscale("log")
            ax.set_title(f"{c.labels[layout.row]} | {layout.group(c)}", fontsize=9)
            ax.legend(fontsize=7)
        for ax in axes[-1]:
            ax.set_xlabel("optimizer step")
        for ax in axes[:, 0]:
            ax.set_ylabel("activation input (p15-p85)" if kind == "pre" else "weight grad norm")
        out.append(_save(fig, path, dpi))
    return out


# ---------------------------------------------------------------------- the one-glance verdict matrix

BETTER = {"best_val_acc": "greater", "test_acc": "greater", "epochs_to_converge": "less", "s_per_epoch": "less",
          "time_to_target": "less", "basin": "greater"}  # which verdict means 'first is better'


def verdict_matrix(rows: Sequence[tuple[Comparison, Sequence[str]]], metrics: Sequence[tuple[str, str]],
                   path: Path, dpi: int = DPI) -> Path:
    """Comparisons (rows) x metrics (columns), each cell coloured by its verdict and labelled with the effect.

    ``rows``: (comparison, the metrics its report line states); a metric it does not state stays blank.
    """
    colors = {"better": "#7fc97f", "worse": "#f0797a", "not_resolved": "#d9d9d9", "": "white"}
    fig, ax = plt.subplots(figsize=(1.45 * len(metrics) + 3.2, max(0.36 * len(rows) + 0.9, 1.8)),
                           layout="constrained")
    for y, (comp, keys) in enumerate(rows):
        for x, (key, _) in enumerate(metrics):
            v = comp.verdicts.get(key, "not_resolved") if key in keys else ""
            kind = "" if not v else "not_resolved" if v == "not_resolved" else (
                "better" if v == BETTER[key] else "worse")
            ax.add_patch(plt.Rectangle((x, y), 1, 1, facecolor=colors[kind], edgecolor="white", lw=2))
            if kind:
                iv = comp.deltas[key]
                scale = 100.0 if key in ("best_val_acc", "test_acc") else 1.0
                est = 0.0 if abs(iv.estimate) < 1e-9 else iv.estimate * scale
                text = "-" if math.isnan(est) else f"{est:+.2g}"
                ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=8)
    ax.set_xlim(0, len(metrics))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([i + 0.5 for i in range(len(metrics))], [label for _, label in metrics], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([i + 0.5 for i in range(len(rows))],
                  [f"{c.group}: {c.a_label} vs {c.b_label}" for c, _ in rows], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    handles = [Patch(facecolor=colors[k], label=lab) for k, lab in
               (("better", "first better"), ("worse", "first worse"), ("not_resolved", "not resolved"))]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _save(fig, path, dpi)
