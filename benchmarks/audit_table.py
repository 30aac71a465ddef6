"""Relearning and quantization audits of the demo result and of every method's best sweep point: the table of
docs/evaluation.md ("Audits on the demo world").

    python benchmarks/audit_table.py --run runs/demo --label "make demo (simnpo)" \\
        --sweep sweeps/pair0 --sweep sweeps/pair0_rmu --out audits/pair0 --jobs 2 --table audits/pair0/table.md

Each model is audited by ``dsunlearn audit`` with its own run's config.json (model.path = the original, the twin from
eval.retrained_model, the same data and eval.max_chunks) and ONE fine-tune learning rate for all
(``--relearn-lr``, default 3e-4): the sweep points were unlearned at different rates, and the relearning curves are
only comparable at the same one. The twin's curve is the same in every audit (same batches, same rate). An audit
already in OUT is not rerun. Best points are chosen as in benchmarks/twin_table.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def audit(run_dir: Path, out: Path, zero: str, relearn_lr: float) -> dict:
    if not (out / "metrics.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "dsunlearn", "audit", "--config", str(run_dir / "config.json"), "--zero", zero,
               "--model", str(run_dir / "model"), "--out", str(out), "--set", f"audit.relearn_lr={relearn_lr}"]
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if p.returncode not in (0, 1):  # 1: an audit failed, which is a result
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())["audits"]


def _steps(k, limit) -> str:
    return f">{limit}" if k is None else str(k)


def row(label: str, run_dir: Path, audits: dict) -> str:
    verdict = json.loads((run_dir / "metrics.json").read_text())["judgement"]["status"]
    r, q = audits["relearn"], audits["quantize"]
    by_bits = {x["bits"]: x for x in q["rows"]}
    aucs = " / ".join(f"{by_bits[b]['strongest_auc']:.3f}" for b in ("full", "8", "4"))
    twin_aucs = " / ".join(f"{by_bits[b]['twin_strongest_auc']:.3f}" for b in ("full", "8", "4"))
    failed = [n for n in ("relearn", "quantize") if audits[n]["failed"]] or ["none"]
    start = r["model"]["points"][0]
    return (f"| {label} | {verdict} | {_steps(r['model_steps_to_relearn'], r['steps'])} | "
            f"{_steps(r['baseline_steps_to_relearn'], r['steps'])} | {start['losses']['forget']:.3f} → "
            f"{r['final']['model_forget_loss']:.3f} | {r['final']['baseline_loss']:.3f} | "
            f"{start['strongest_auc']:.3f} → {r['final']['model_strongest_auc']:.3f} | "
            f"{r['final']['baseline_strongest_auc']:.3f} | {aucs} | {twin_aucs} | {', '.join(failed)} |")


def main() -> None:
    from twin_table import best_points
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="an unlearning run directory (repeatable)")
    ap.add_argument("--label", action="append", default=[], help="a label per --run")
    ap.add_argument("--sweep", action="append", default=[], help="a dsunlearn sweep directory (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--zero", default="ds_configs/zero3_cpu_test.json")
    ap.add_argument("--relearn-lr", type=float, default=3e-4)
    ap.add_argument("--jobs", type=int, default=1, help="audits at once (one CPU thread each)")
    ap.add_argument("--table", help="also write the markdown table here")
    args = ap.parse_args()
    if len(args.label) != len(args.run):
        ap.error("give one --label per --run")
    targets = [(label, Path(r)) for label, r in zip(args.label, args.run)]
    for sweep in args.sweep:
        best, _ = best_points(Path(sweep))
        targets += [(f"{m} (best point)", Path(b["run_dir"])) for m, b in sorted(best.items())]
    out = Path(args.out)

    def one(target):
        label, run_dir = target
        name = label.split(" ")[0].replace(":", "-")
        return audit(run_dir, out / name, args.zero, args.relearn_lr)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, targets))
    first = results[0]["relearn"]
    lines = [f"Fine-tune: {first['steps']} steps x {first['batch_size']} chunks at lr {first['lr']:g} on "
             f"{first['data']}; relearned = held-out forget loss within {first['within']:g} of the original's "
             f"({first['threshold']:.3f} nats here; the original's is {first['original']['losses']['forget']:.3f}). "
             f"Strongest attack AUC over every attack but the reference one, full / 8-bit / 4-bit weights "
             f"(RTN, group {results[0]['quantize']['group_size']}).", "",
             "| model | verdict | steps to relearn | twin's | held-out forget loss, before → after the fine-tune | "
             "twin's after | held-out strongest AUC, before → after | twin's after | strongest AUC full / 8 / 4 bits | "
             "twin's | audits failed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(label, run_dir, res) for (label, run_dir), res in zip(targets, results)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(text)


if __name__ == "__main__":
    main()
