"""Seconds per optimizer step of `dsunlearn unlearn` (GA+GD) on 1 and 2 CPU ranks, ZeRO-3 (zero3_cpu_test.json).

    python benchmarks/bench_step_time.py [--steps 30] [--hidden 128 --layers 4 --seq-len 128 --global-batch 8]

Same model, data and global batch for both: 1 rank x micro 8, and 2 ranks x micro 4 through the deepspeed launcher.
Medians over the steps after the first 5 (warm-up). Prints a markdown table with the machine and versions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=8)
    args = ap.parse_args()
    from helpers import CPU_ZERO3, free_port, run_cli, write_run_config, deepspeed_launcher
    from dsunlearn.toy import build_toy_world
    import torch
    import deepspeed
    root = Path(tempfile.mkdtemp(prefix="bench_step_"))
    world = build_toy_world(str(root / "world"), num_docs=64, hidden_size=args.hidden, num_layers=args.layers,
                            seq_len=args.seq_len)
    rows = []
    for ranks in (1, 2):
        cfg = write_run_config(root / f"r{ranks}.json", world, root / f"r{ranks}",
                               data={"seq_len": args.seq_len, "approximate": None, "general": None},
                               train={"micro_batch_size": args.global_batch // ranks, "num_steps": args.steps})
        launcher = deepspeed_launcher(ranks)
        p = run_cli(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3], launcher=launcher, timeout=1200)
        assert p.returncode == 0, p.stderr[-2000:]
        log = [json.loads(l) for l in (root / f"r{ranks}" / "log.jsonl").read_text().splitlines()][5:]
        rows.append((ranks, statistics.median(r["step_seconds"] for r in log),
                     statistics.median(r["tokens_per_s"] for r in log)))
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        world["model"]).parameters())
    print(f"# step time, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    print(f"command: python benchmarks/bench_step_time.py --steps {args.steps} --hidden {args.hidden} "
          f"--layers {args.layers} --seq-len {args.seq_len} --global-batch {args.global_batch}")
    print(f"model: Llama {params:,} params; GA+GD; global batch {args.global_batch} forget + {args.global_batch} "
          f"retain chunks x {args.seq_len} tokens; load average {os.getloadavg()[0]:.1f}\n")
    print("| ranks | s / optimizer step (median) | tokens/s (all ranks, non-pad) |\n|---|---|---|")
    for ranks, sec, tps in rows:
        print(f"| {ranks} | {sec:.3f} | {tps:,.0f} |")


if __name__ == "__main__":
    main()
