"""PNG plots of evaluation results (matplotlib, Agg canvas; no pyplot global state, safe from any thread)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


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
