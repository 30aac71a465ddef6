"""Peak memory and step time of LoRA unlearning against full fine-tuning, for GA+KL and NPO on the same model.

    python benchmarks/bench_lora.py                                   # 2 CPU ranks, ZeRO-3 fp32, ~60M-param Llama
    python benchmarks/bench_lora.py --ranks 1 --zero ds_configs/zero3.json --hidden 2048 --layers 16   # on a GPU

Each (method, full | LoRA) is one ``deepspeed --num_gpus R`` launch of this script with ``--worker``: a real
``loop.unlearn`` run in fresh processes (no evaluation, no export). Full fine-tuning takes theta_0 from a frozen ZeRO-3
engine (``reference.mode = "engine"``, the default); LoRA from the adapters switched off (``"adapters_off"``, the
default with an adapter). Every rank reports its RSS high-water mark (``VmHWM``) and, on a GPU, the accelerator's
``max_memory_allocated``; the step time is the median ``step_seconds`` of ``log.jsonl`` after the first step. The
model is random (LlamaForCausalLM, 32k vocabulary, tied embeddings; ``bench_reference_memory.build_world``): memory and
time do not depend on the weights' values. Output: a markdown table and the LoRA / full ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def worker(config: str, out_dir: str) -> int:
    import torch
    from bench_reference_memory import memory_kib
    from dsunlearn import loop
    from dsunlearn.config import load_run_config
    code = loop.unlearn(load_run_config(config), os.environ["BENCH_ZERO"])
    marks = {"end": memory_kib()}
    if torch.cuda.is_available():
        marks["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    Path(out_dir, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(marks))
    return code


def run_one(method: str, rank: int, world: dict, work: Path, args) -> dict:
    label = f"{method}-{'lora' if rank else 'full'}"
    run_dir, out = work / "runs" / label, work / "marks" / label
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = {"model": {"path": world["model"]},
           "data": {k: world[k] for k in ("forget", "retain")} | {"seq_len": args.seq_len},
           "method": {"name": method}, "adapter": {"rank": rank, "alpha": 2.0 * rank or 16.0},
           "train": {"micro_batch_size": args.micro_batch_size, "num_steps": args.steps, "lr": 1e-5,
                     "warmup_ratio": 0.0},
           "eval": {"splits": []}, "output": {"run_dir": str(run_dir), "save_model": False}}
    if method == "npo":
        cfg["method"]["params"] = {"retain_loss": "nll"}  # NPO-RT: the forget and retain streams, like GA+KL
        cfg["method"]["weights"] = {"retain": 1.0}
    cfg_path = work / f"{label}.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    from bench_reference_memory import launch_workers
    marks = launch_workers(__file__, cfg_path, out, args.ranks, label, gpu=args.gpu,
                           extra_env={"BENCH_ZERO": str(Path(args.zero).resolve())})
    steps = [json.loads(line)["step_seconds"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    shutil.rmtree(work / "runs", ignore_errors=True)
    return {"label": label, "peak_kib": max(m["end"]["VmHWM"] for m in marks.values()),
            "cuda_peak": max((m.get("cuda_max_allocated", 0) for m in marks.values()), default=0),
            "step_seconds": statistics.median(steps[1:] or steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", default=str(REPO / ".cache" / "bench_lora"))
    ap.add_argument("--zero", default=str(REPO / "ds_configs" / "zero3_cpu_test.json"))
    ap.add_argument("--gpu", action="store_true", help="use the CUDA accelerator (default: CPU ranks over gloo)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--methods", nargs="+", default=["ga_kl", "npo"])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--num-docs", type=int, default=8)
    args, _ = ap.parse_known_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    if args.worker:
        sys.exit(worker(args.config, args.out))

    from bench_reference_memory import build_world
    work = Path(args.work_dir)
    world = build_world(work / "world", args.hidden, args.layers, args.vocab, args.seq_len, args.num_docs)
    rows = {(m, r): run_one(m, r, world, work, args) for m in args.methods for r in (0, args.rank)}
    command = "python benchmarks/bench_lora.py " + " ".join(sys.argv[1:])
    print(f"\n{world['num_params'] / 1e6:.1f}M-param Llama (hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}), {args.ranks} {'GPU' if args.gpu else 'CPU'} rank(s), {Path(args.zero).name}, micro-batch "
          f"{args.micro_batch_size} forget + {args.micro_batch_size} retain chunks of {args.seq_len} tokens, "
          f"{args.steps} steps, LoRA rank {args.rank} on every attention and MLP projection.\n`{command.strip()}`\n")
    gpu = args.gpu
    print("| method | theta_0 | peak RSS per rank (MiB) |" + (" peak GPU memory (MiB) |" if gpu else "")
          + " step (s) |")
    print("|---|---|---|" + ("---|" if gpu else "") + "---|")
    for (m, r), row in rows.items():
        mode = f"LoRA r={r}, adapters off" if r else "full, reference engine"
        print(f"| {m} | {mode} | {row['peak_kib'] / 1024:.0f} |" + (f" {row['cuda_peak'] / 2**20:.0f} |" if gpu else "")
              + f" {row['step_seconds']:.3f} |")
    print()
    for m in args.methods:
        full, lora = rows[(m, 0)], rows[(m, args.rank)]
        key = "cuda_peak" if gpu else "peak_kib"
        print(f"{m}: LoRA / full peak memory {lora[key] / full[key]:.2f}, step time "
              f"{lora['step_seconds'] / full['step_seconds']:.2f}")


if __name__ == "__main__":
    main()
