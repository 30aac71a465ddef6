"""Project the fused and the two-pass GA+GD step to a 7B model on 2 and 8 nodes of 8 GPUs, from measured copy counts.

    python benchmarks/project_fused.py                                    # the factors measured on 2026-11-25
    python benchmarks/project_fused.py --json .cache/bench_fused/live015.json   # refit them from a bench_fused run

Inputs (see docs/benchmarks.md, "Projection to a 7B model on 2 and 8 nodes of 8 GPUs"):
  copies    full model copies all-gathered / reduce-scattered per optimizer step, measured by bench_fused.py with
            ZeRO-3's live-parameter budget at 0.15 x the model (what ds_configs/zero3.json's 1e9 is for a 6.7B model)
  model     Llama-2-7B's shape, bf16 parameters and gradients: one copy = 2 bytes x 6.74e9
  compute   dsunlearn.cost.step_flops for 2 forget + 2 retain chunks of 2048 tokens per GPU, at an achieved rate
  network   one full-copy collective over n = 8 x nodes GPUs takes (n - 1) / n x copy bytes / node bandwidth
            (NCCL ring over 8 rails: each node's NICs carry about one copy per collective)
Step time: fused = max(compute, all comm) (ZeRO-3 prefetches along its recorded trace; the reduce-scatter overlaps the
backward); two-pass = max(compute, reduce-scatter + 1 copy) + the other all-gathers: its trace never covers a backward
(forward 1 records, forward 2 runs on that forward-only trace and is prefetched, the backward invalidates it), so the
first forward and the backward gather each module on demand, blocking. Both bounds, max(C, M) and C + M, are printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsunlearn.cost import ModelShape, Pass, step_flops  # noqa: E402

# Measured 2026-11-25 (benchmarks/RESULTS.md, section 2, run "live 0.15"): largest model's value, the trend grows with size.
COPIES = {"fused": {"all_gather": 1.80, "reduce_scatter": 1.00},
          "two_pass": {"all_gather": 3.80, "reduce_scatter": 1.00}}
LLAMA2_7B = ModelShape(num_params=6_738_415_616, num_embedding_params=2 * 32000 * 4096, num_layers=32,
                       hidden_size=4096, vocab_size=32000)


def copies_from_json(path: str) -> dict:
    """The largest model's copies per step in a bench_fused --json file."""
    cell = max(json.loads(Path(path).read_text())["cells"], key=lambda c: c["num_params"])
    n = cell["num_params"] * 4  # the CPU benchmark runs fp32
    return {d: {"all_gather": cell["ga_gd"][d]["all_gather_bytes"] / n,
                "reduce_scatter": cell["ga_gd"][d]["reduce_scatter_bytes"] / n} for d in ("fused", "two_pass")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="refit the copy counts from this bench_fused.py --json output")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--chunks-per-gpu", type=int, default=4, help="forget + retain chunks per GPU per step")
    ap.add_argument("--tflops", type=float, default=400.0, help="achieved TFLOP/s per GPU")
    ap.add_argument("--node-gbits", type=float, nargs="+", default=[100, 400, 3200], help="inter-node Gb/s per node")
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 8])
    args = ap.parse_args()
    copies = copies_from_json(args.json) if args.json else COPIES
    shape = LLAMA2_7B
    tokens = args.chunks_per_gpu * args.seq_len
    flops = step_flops(shape, args.seq_len, [Pass("train", tokens)])["total"]
    compute = flops / (args.tflops * 1e12)
    copy_bytes = 2 * shape.num_params
    print(f"model {shape.num_params / 1e9:.2f}B, one bf16 copy {copy_bytes / 1e9:.2f} GB; "
          f"{tokens} tokens per GPU per step, "
          f"{flops:.3g} FLOPs per GPU per step, compute {compute:.2f} s at {args.tflops:.0f} TFLOP/s")
    print("copies per step: " + "; ".join(f"{d} AG {c['all_gather']:.2f} RS {c['reduce_scatter']:.2f}"
                                          for d, c in copies.items()))
    print()
    print("| nodes x GPUs | tokens/step | Gb/s per node | one copy (s) | comm F (s) | comm 2P (s) | step F (s) "
          "| step 2P (s) | 2P / F | bounds F [max, sum] | bounds 2P [max, sum] | tok/s/GPU F | tok/s/GPU 2P |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for nodes in args.nodes:
        n = 8 * nodes
        for gbits in args.node_gbits:
            t_copy = (n - 1) / n * copy_bytes / (gbits / 8 * 1e9)
            comm = {d: (c["all_gather"] + c["reduce_scatter"]) * t_copy for d, c in copies.items()}
            fused = max(compute, comm["fused"])
            # The second forward's copy is prefetched (overlappable); the first forward's and the backward's are not.
            two = (max(compute, (copies["two_pass"]["reduce_scatter"] + 1) * t_copy)
                   + (copies["two_pass"]["all_gather"] - 1) * t_copy)
            print(f"| {nodes} x 8 | {tokens * n:,} | {gbits:g} | {t_copy:.3f} | {comm['fused']:.2f} "
                  f"| {comm['two_pass']:.2f} | {fused:.2f} | {two:.2f} | {two / fused:.2f} "
                  f"| [{max(compute, comm['fused']):.2f}, {compute + comm['fused']:.2f}] "
                  f"| [{max(compute, comm['two_pass']):.2f}, {compute + comm['two_pass']:.2f}] "
                  f"| {tokens / fused:,.0f} | {tokens / two:,.0f} |")


if __name__ == "__main__":
    main()
