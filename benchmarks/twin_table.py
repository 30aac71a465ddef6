"""Distance to the retrained twin, per method, from `dsunlearn sweep` outputs on one or more model pairs: the table and
the Pareto plot of docs/tuning.md ("Every method's best point against the twin").

    python benchmarks/twin_table.py --sweep sweeps/pair0 --label committed --sweep sweeps/pair0_rmu --label committed \\
        --sweep sweeps/pair1 --label seed-1 --sweep sweeps/pair1_rmu --label seed-1 --plot docs/img/twin_pareto.png

For every method of every sweep, its best point is the one whose exported weights the verdict judges closest to
"forgotten" (``judgement.distance``, eval/verdict.py: forgotten first, then forget shortfall + AUC excess + utility
excess). Gaps are against the twin (``eval.retrained_model``), on the evaluated chunks: forget / retain / approximate
loss in % of the twin's; the strongest attack's AUC minus the twin's strongest (its own reference attack left out);
MUSE's PrivLeak; the run's FLOPs as a fraction of the twin's pretraining (``cost.pretrain_tokens`` must be set in the
sweep, e.g. from the pair's pair.json). The plot: retain damage (% above the twin's retain loss) against the
strongest-AUC gap, every point of every sweep faded, each method's best bold, the twin at (0, 0), the goal's box
(retain within 3%, AUC within 0.05).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL = {"forget": 2.0, "retain": 3.0, "approximate": 3.0, "auc": 0.05, "flops": 0.1}


def point_row(run_dir: Path) -> dict | None:
    """The twin-relative figures of one finished point, or None when it did not finish."""
    from dsunlearn.eval.verdict import REFERENCE_ATTACK, extreme_attacks
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    after, twin = metrics.get("after"), metrics.get("retrained")
    if not after or not twin or "judgement" not in metrics:
        return None
    row = {"run_dir": str(run_dir), "distance": metrics["judgement"]["distance"],
           "status": metrics["judgement"]["status"], "exported_step": metrics.get("exported_step")}
    for split in ("forget", "retain", "approximate"):
        a, t = after["splits"][split]["loss"], twin["splits"][split]["loss"]
        row[split] = 100.0 * (a - t) / t if math.isfinite(a) else math.inf
    (attack, auc), _ = extreme_attacks(after["mia"])
    (_, twin_auc), _ = extreme_attacks(twin["mia"], exclude=(REFERENCE_ATTACK,))
    row.update(attack=attack, auc=auc, auc_gap=auc - twin_auc,
               privleak=(metrics.get("distance_to_retraining") or {}).get("privleak"))
    retrain = ((summary.get("cost") or {}).get("retrain") or {})
    row["flops"] = 1.0 / retrain["ratio"] if retrain.get("ratio") else None
    row["meets_goal"] = (abs(row["forget"]) <= GOAL["forget"] and abs(row["retain"]) <= GOAL["retain"]
                         and abs(row["approximate"]) <= GOAL["approximate"] and abs(row["auc_gap"]) <= GOAL["auc"]
                         and row["flops"] is not None and row["flops"] <= GOAL["flops"])
    return row


def best_points(sweep_dir: Path) -> tuple[dict[str, dict], list[dict]]:
    """(method label -> its best row, every finished row) of one sweep."""
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    best, rows = {}, []
    for p in sweep["points"]:
        row = point_row(Path(p["run_dir"]))
        if row is None:
            continue
        row.update(method=p["method"], params=p["params"])
        rows.append(row)
        key = (0 if row["status"] == "forgotten" else 1, row["distance"], row["retain"])
        if p["method"] not in best or key < best[p["method"]]["_key"]:
            best[p["method"]] = {**row, "_key": key}
    return best, rows


def _f(x, digits=1, sign=True) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return "inf"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def finish_pareto(fig, ax, path: str, *, title: str, ylabel: str, legend_loc: str) -> None:
    """The frame every retain-vs-AUC plot shares: the twin at the origin, the goal's box, the axes, the legend, the
    PNG at ``path``."""
    import matplotlib.pyplot as plt
    ax.scatter([0], [0], s=160, marker="*", color="gold", edgecolor="black", zorder=5, label="retrained twin")
    ax.add_patch(plt.Rectangle((-GOAL["retain"], -GOAL["auc"]), 2 * GOAL["retain"], 2 * GOAL["auc"],
                               fill=False, linestyle="--", edgecolor="green", label="goal (retain ±3%, AUC ±0.05)"))
    ax.set_xlabel("retain loss vs the twin's (%): the utility paid")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=6, ncol=2, loc=legend_loc)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="append", required=True, help="a `dsunlearn sweep --out` directory")
    ap.add_argument("--label", action="append", help="one label per --sweep (default: the directory name)")
    ap.add_argument("--plot", help="write the Pareto plot here (PNG)")
    args = ap.parse_args()
    labels = args.label or [Path(s).name for s in args.sweep]
    if len(labels) != len(args.sweep):
        sys.exit("give one --label per --sweep")
    results: dict[str, tuple[dict, list]] = {}  # sweeps with the same label (one pair) are merged
    for label, s in zip(labels, args.sweep):
        best, rows = best_points(Path(s))
        merged_best, merged_rows = results.setdefault(label, ({}, []))
        merged_best.update(best)
        merged_rows.extend(rows)
    methods = sorted({m for best, _ in results.values() for m in best})
    print("| method | pair | forget | retain | approx | strongest attack (AUC) | AUC − twin's | PrivLeak | "
          "FLOPs / pretraining | params | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in methods:
        for label, (best, _) in results.items():
            r = best.get(m)
            if r is None:
                continue
            params = ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in r["params"].items())
            mark = " **goal met**" if r["meets_goal"] else ""
            print(f"| {m} | {label} | {_f(r['forget'])}% | {_f(r['retain'])}% | {_f(r['approximate'])}% | "
                  f"{r['attack']} ({r['auc']:.3f}) | {_f(r['auc_gap'], 3)} | {_f(r['privleak'], 3)} | "
                  f"{_f(r['flops'], 4, sign=False)} | {params}, step {r['exported_step']} | {r['status']}{mark} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5.5))
        markers = ["o", "s", "^", "D"]
        colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
        for i, (label, (best, rows)) in enumerate(results.items()):
            mk = markers[i % len(markers)]
            for r in rows:
                if math.isfinite(r["retain"]):
                    ax.scatter(r["retain"], r["auc_gap"], s=14, marker=mk, color=colours[r["method"]], alpha=0.25)
            for m, r in best.items():
                if math.isfinite(r["retain"]):
                    ax.scatter(r["retain"], r["auc_gap"], s=70, marker=mk, color=colours[m], edgecolor="black",
                               label=f"{m} ({label})")
        finish_pareto(fig, ax, args.plot, title="Distance to retraining: every sweep point (faded), each method's "
                      "best (bold)", ylabel="strongest-attack AUC − the twin's strongest: what an attacker still sees",
                      legend_loc="upper right")


if __name__ == "__main__":
    main()
