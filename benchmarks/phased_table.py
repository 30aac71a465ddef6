"""The table and Pareto plot of docs/tuning.md, "Methods in phases": one run per method per pair
(``benchmarks/phased_runs.sh``), each against its pair's retrained twin, with the relearning audit's worst rate.

    python benchmarks/phased_table.py --runs runs/phased0 --label committed --runs runs/phased1 --label seed-1 \\
        --plot docs/img/phased_pareto.png

Columns as in ``twin_table.py`` (forget / retain / approximate loss against the twin's, on the report part of the
documents; the strongest attack and its AUC minus the twin's strongest; PrivLeak; FLOPs as a fraction of the twin's
pretraining), then the exported step, the tool's own verdict and the relearning audit: steps until the held-out
forget loss is back within ``audit.relearn_within`` of the original's, for the model and the twin, at the worst of
the fine-tune learning rates (``audit.relearn_lr``); "–" = not within the audit's steps. PASS = the model takes no
fewer steps than the twin at every rate.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from twin_table import GOAL, _f, finish_pareto, point_row  # noqa: E402


def relearn(run_dir: Path) -> str:
    """The run's own relearning audit, else one run afterwards into ``<run>_audit`` (``dsunlearn audit --out``)."""
    for source in (run_dir, run_dir.with_name(run_dir.name + "_audit")):
        try:
            audit = json.loads((source / "metrics.json").read_text())["audits"]["relearn"]
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    else:
        return "–"
    steps = lambda s: "–" if s is None else str(s)  # noqa: E731
    worst = f"{steps(audit['model_steps_to_relearn'])} vs {steps(audit['baseline_steps_to_relearn'])}"
    rates = ", ".join(f"{r['lr']:g}: {steps(r['model_steps_to_relearn'])}" for r in audit.get("rates", []))
    return f"{'FAIL' if audit['failed'] else 'PASS'} {worst} (per rate {rates})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", action="append", required=True, help="a phased_runs.sh OUT directory")
    ap.add_argument("--label", action="append", required=True)
    ap.add_argument("--plot")
    args = ap.parse_args()
    rows = []
    for label, runs in zip(args.label, args.runs):
        for d in sorted(Path(runs).iterdir()):
            row = point_row(d) if d.is_dir() else None
            if row is not None:
                rows.append({**row, "method": d.name, "pair": label, "relearn": relearn(d)})
    print("| method | pair | forget | retain | approx | strongest attack (AUC) | AUC − twin's | PrivLeak | "
          "FLOPs / pretraining | step | verdict | relearning (model vs twin, steps) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["method"], r["pair"])):
        mark = " **goal met**" if r["meets_goal"] else ""
        print(f"| {r['method']} | {r['pair']} | {_f(r['forget'])}% | {_f(r['retain'])}% | {_f(r['approximate'])}% | "
              f"{r['attack']} ({r['auc']:.3f}) | {_f(r['auc_gap'], 3)} | {_f(r['privleak'], 3)} | "
              f"{_f(r['flops'], 4, sign=False)} | {r['exported_step']} | {r['status']}{mark} | {r['relearn']} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5.5))
        methods = sorted({r["method"] for r in rows})
        colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
        markers = {label: mk for label, mk in zip(args.label, ["o", "s", "^", "D"])}
        for r in rows:
            if math.isfinite(r["retain"]):
                ax.scatter(r["retain"], r["auc_gap"], s=80, marker=markers[r["pair"]], color=colours[r["method"]],
                           edgecolor="black", label=f"{r['method']} ({r['pair']})")
        finish_pareto(fig, ax, args.plot, title="Methods in phases and SimNPO, shipped configs, against the twin",
                      ylabel="strongest-attack AUC − the twin's strongest", legend_loc="lower right")


if __name__ == "__main__":
    main()
