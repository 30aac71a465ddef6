"""PNG plots of evaluation results (matplotlib, Agg canvas; no pyplot global state, safe from any thread)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


STATE_NAMES = {"before": "original", "after": "unlearned", "retrained": "twin", "model": "model"}
"""How the memorisation tables and plots name each model state."""


def _figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.5 * ncols, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_roc(curves: Mapping[str, tuple[Sequence[float], Sequence[float], float]], path) -> Path:
    """ROC curves ``{attack name: (fpr, tpr, auc)}``: linear axes, and log-log axes where the low-FPR regime that
    matters for membership inference is visible (Carlini et al., S&P 2022)."""
    fig, (lin, log) = _figure(2)
    for name, (fpr, tpr, auc) in curves.items():
        for ax in (lin, log):
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    for ax in (lin, log):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    lin.set_xlim(0, 1)
    lin.set_ylim(0, 1)
    lin.legend(loc="lower right", fontsize="small")
    log.set_xscale("log")
    log.set_yscale("log")
    log.set_xlim(1e-3, 1)
    log.set_ylim(1e-3, 1)
    log.set_title("log scale")
    return _save(fig, path)


def plot_loss_histograms(forget_losses, approx_losses, path, retrained=None) -> Path:
    """Histograms of per-chunk losses: the forget split and the approximate (non-member) split under the unlearned
    model, and optionally the forget split under the retrained model. A good unlearning run makes the forget
    histogram look like the approximate / retrained one."""
    series = {"forget": forget_losses, "approximate": approx_losses}
    if retrained is not None:
        series["forget (retrained)"] = retrained
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in series.items()}
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values()])
    bins = np.histogram_bin_edges(finite, bins=40) if finite.size else 40
    fig, (ax,) = _figure()
    for name, values in arrays.items():
        ax.hist(values[np.isfinite(values)], bins=bins, alpha=0.5, label=f"{name} (n={values.size})")
    ax.set_xlabel("per-chunk mean token loss")
    ax.set_ylabel("chunks")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_split_losses_over_steps(history: Sequence[Mapping[str, float]], path,
                                 targets: Mapping[str, float] | None = None) -> Path:
    """Loss per split over unlearning steps. ``history`` is a list of ``{"step": s, split: loss, ...}`` records (a
    split missing from a record is a gap); ``targets`` draws horizontal reference lines, e.g.
    ``{"retrained forget loss": 3.1}``."""
    splits = sorted({k for record in history for k in record if k != "step"})
    fig, (ax,) = _figure()
    for split in splits:
        points = [(r["step"], r[split]) for r in history if split in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=split)
    for i, (name, value) in enumerate((targets or {}).items()):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{(len(splits) + i) % 10}", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("mean token loss")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_relearning(relearn: Mapping, path, baseline_label: str) -> Path:
    """The relearning audit: held-out forget loss (left) and strongest-attack AUC (right) per fine-tune step, for the
    model and its baseline on one axis, with the original model's loss and the "relearned" threshold."""
    fig, (loss_ax, auc_ax) = _figure(2)
    split = relearn["baseline_split"]
    for label, curve, key in (("unlearned model (held-out forget)", relearn["model"], "forget"),
                              (baseline_label, relearn["baseline_curve"], split)):
        steps = [q["step"] for q in curve["points"]]
        loss_ax.plot(steps, [q["losses"][key] for q in curve["points"]], marker="o", markersize=3, label=label)
        auc_ax.plot(steps, [q["strongest_auc"] for q in curve["points"]], marker="o", markersize=3, label=label)
    loss_ax.axhline(relearn["original"]["losses"]["forget"], linestyle="--", linewidth=1, color="C3",
                    label="original model (held-out forget)")
    loss_ax.axhline(relearn["threshold"], linestyle=":", linewidth=1, color="C4",
                    label=f"relearned (within {relearn['within']:g})")
    auc_ax.axhline(0.5, linestyle="--", linewidth=1, color="grey", label="chance")
    loss_ax.set_xlabel("fine-tune step")
    loss_ax.set_ylabel("mean token loss")
    auc_ax.set_xlabel("fine-tune step")
    auc_ax.set_ylabel("strongest attack AUC")
    loss_ax.legend(fontsize="small")
    auc_ax.legend(fontsize="small")
    return _save(fig, path)


def plot_sweep_heatmap(x_values: Sequence, y_values: Sequence, gap, degraded, in_band, path, *, title: str,
                       x_label: str, y_label: str, limit: float, band: float, overshot=None) -> Path:
    """One method's sweep grid: cell colour = forget-loss gap to the target (nats), an x where the retain loss
    degraded beyond the tolerance, a triangle where the final weights overshot the band (``overshot``), a green frame
    where the point is in the target band. ``gap``/``degraded``/``in_band``/``overshot`` have shape
    (len(y_values), len(x_values)); NaN gaps (not run, or non-finite) are grey.

    The colour scale is symmetric-log around 0, linear within +-``band`` (the forget tolerance, so the band stays
    pale), and shared by every heatmap of a sweep (``limit``) so methods compare by eye: red = forget loss above the
    target (over-unlearned), blue = below it (not yet forgotten).
    """
    from matplotlib import colormaps
    from matplotlib.colors import SymLogNorm
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter

    gap = np.asarray(gap, dtype=np.float64)
    cmap = colormaps["RdBu_r"].with_extremes(bad="#bbbbbb")
    limit = max(float(limit), 5 * band)
    norm = SymLogNorm(linthresh=band, linscale=0.5, vmin=-limit, vmax=limit, base=10)
    fig = Figure(figsize=(max(1.4 * len(x_values) + 2.4, 5.2), 0.9 * len(y_values) + 2.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(gap), cmap=cmap, norm=norm, origin="lower", aspect="auto")
    for i in range(len(y_values)):
        for j in range(len(x_values)):
            value = gap[i, j]
            dark = np.isfinite(value) and abs(float(norm(value)) - 0.5) > 0.3
            colour = "white" if dark else "black"
            ax.text(j, i + 0.22, "–" if not np.isfinite(value) else f"{value:+.2f}", ha="center", va="center",
                    fontsize=9, color=colour)
            if degraded[i][j]:
                ax.plot(j, i - 0.12, marker="x", markersize=11, markeredgewidth=2.2, color=colour)
            if overshot is not None and overshot[i][j]:
                ax.plot(j + 0.3, i + 0.3, marker="^", markersize=8, color=colour)
            if in_band[i][j]:
                ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="#1a9641", linewidth=3))
    ax.set_xticks(range(len(x_values)), [str(v) for v in x_values])
    ax.set_yticks(range(len(y_values)), [str(v) for v in y_values])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{title}\nx: retain degraded   ^: final weights overshot   green frame: in band", fontsize=8)
    bar = fig.colorbar(image, ax=ax, label="forget loss − target (nats)")
    ticks = sorted({0.0, band, -band, limit, -limit, *(t for t in (1.0, -1.0, 10.0, -10.0) if abs(t) < limit)})
    bar.set_ticks(ticks)
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    return _save(fig, path)


def plot_memorisation(columns: Mapping[str, Optional[Mapping]], generation: Optional[Mapping], path) -> Optional[Path]:
    """Grouped bars per split: VerbMem (``generation["scores"]``) and teacher-forced exact memorisation (each
    evaluation's splits), one bar per model state (before / after / retrained). None when neither was measured."""
    states = [k for k, v in columns.items() if v]
    splits = ("forget", "approximate", "retain")
    exact = {k: [columns[k]["splits"].get(s, {}).get("exact_memorisation") for s in splits] for k in states}
    scores = (generation or {}).get("scores") or {}
    verb = {k: [scores.get(k, {}).get(f"verbmem/{s}") for s in splits] for k in scores}
    panels = [(title, series) for title, series in (("VerbMem (ROUGE-L F1, generated)", verb),
                                                   ("exact memorisation (teacher-forced)", exact))
              if any(v is not None for values in series.values() for v in values)]
    if not panels:
        return None
    top = max(v for _, series in panels for values in series.values() for v in values if v is not None)
    fig, axes = _figure(len(panels))
    for ax, (title, series) in zip(axes, panels):
        width = 0.8 / max(1, len(series))
        for i, (state, values) in enumerate(series.items()):
            x = np.arange(len(splits)) + i * width
            ax.bar(x, [np.nan if v is None else v for v in values], width, label=STATE_NAMES.get(state, state))
        ax.set_xticks(np.arange(len(splits)) + 0.4 - width / 2, splits)
        ax.set_ylim(0, min(1.0, max(0.3, 1.25 * top)))  # small scores stay readable; 1 = verbatim
        ax.set_title(title)
        ax.legend(fontsize="small")
    return _save(fig, path)
