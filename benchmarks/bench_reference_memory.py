"""Peak memory per rank of GA+KL with the reference model as a frozen ZeRO-3 engine vs as a cache.

    python benchmarks/bench_reference_memory.py                       # 2 CPU ranks, ZeRO-3 fp32, ~28M-param Llama
    python benchmarks/bench_reference_memory.py --seq-len 1024 --steps 3 --modes engine cache

Each mode is one ``deepspeed --num_gpus 2`` launch of this script with ``--worker``: a real ``loop.unlearn`` run
(``method.name = ga_kl``, ``reference.mode`` = the mode, ``reference.topk`` = 64, no evaluation, no export) in fresh
processes, so nothing of one mode's allocations survives into the other's. Every rank reports its RSS high-water mark
(``VmHWM`` in ``/proc/self/status``) at three points: after the trained engine is built (the loop's
``reference_factory`` hook, before the reference), after the reference is built (cache mode: after the cache pass),
and at the end of the run. The cache is built inside the measured run (not reused), so its own pass counts.

The model is random (LlamaForCausalLM, 32k vocabulary like Llama-2, tied embeddings) on the toy world's documents
made long enough to fill ``--seq-len`` tokens; memory does not depend on the weights' values. Output: a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZERO = REPO / "ds_configs" / "zero3_cpu_test.json"


def memory_kib() -> dict:
    """This process's current RSS and its high-water mark, in KiB (/proc/self/status), plus getrusage's maxrss."""
    out = {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one rank of one measured run

def worker(config: str, out_dir: str) -> int:
    from dsunlearn import loop
    from dsunlearn import reference as R
    from dsunlearn.config import load_run_config
    marks = {}

    def factory(cfg, ds_config, method, engine, streams, tokenizer):
        marks["engine_built"] = memory_kib()
        ref = R.build_reference(cfg, ds_config, method, engine, streams, tokenizer)
        marks["reference_built"] = memory_kib()
        return ref

    start = time.perf_counter()
    code = loop.unlearn(load_run_config(config), str(ZERO), reference_factory=factory)
    marks["end"] = memory_kib()
    marks["seconds"] = time.perf_counter() - start
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(marks))
    return code


# ---------------------------------------------------------------------------------------------------------------------
# Driver

def build_world(root: Path, hidden: int, layers: int, vocab: int, seq_len: int, num_docs: int) -> dict:
    """Toy documents long enough for one full chunk each, the toy tokenizer, a random Llama with a ``vocab`` head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from dsunlearn.toy import SPLITS, generate_documents, train_toy_tokenizer, write_jsonl
    marker = root / "world.json"
    spec = {"hidden": hidden, "layers": layers, "vocab": vocab, "seq_len": seq_len, "num_docs": num_docs}
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        return json.loads(marker.read_text())["paths"]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    texts = {name: generate_documents(num_docs, seed=i, words_per_doc=seq_len // 2 + 16)
             for i, name in enumerate(SPLITS)}
    paths = {}
    for name, docs in texts.items():
        paths[name] = str(root / f"{name}.jsonl")
        write_jsonl(Path(paths[name]), docs, name)
    tok = train_toy_tokenizer([t for docs in texts.values() for t in docs], str(root / "model"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=max(seq_len, 512), tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model", safe_serialization=True)
    paths["model"] = str(root / "model")
    paths["num_params"] = sum(p.numel() for p in model.parameters())
    marker.write_text(json.dumps({"spec": spec, "paths": paths}))
    return paths


def launch_workers(script: str, cfg_path: Path, out: Path, ranks: int, label: str, gpu: bool = False,
                   extra_env: dict | None = None) -> dict:
    """``deepspeed --num_gpus RANKS SCRIPT --worker --config CFG --out OUT`` in fresh processes (CPU ranks over gloo
    unless ``gpu``); returns every rank's marks (``OUT/rank<r>.json``), or exits with the run's output."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                            str(REPO / ".torch_extensions")),
               **(extra_env or {}))
    if not gpu:
        env.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    from dsunlearn.engine import _free_port
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(_free_port()), script,
           "--worker", "--config", str(cfg_path), "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        sys.exit(f"{label} run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)}


def run_mode(mode: str, world: dict, work: Path, args) -> dict:
    run_dir = work / "runs" / mode
    shutil.rmtree(work / "runs", ignore_errors=True)  # the cache too: cache mode builds it inside the measured run
    out = work / "marks" / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = {"model": {"path": world["model"]},
           "data": {k: world[k] for k in ("forget", "retain")} | {"seq_len": args.seq_len},
           "method": {"name": "ga_kl"}, "reference": {"mode": mode, "topk": args.topk},
           "train": {"micro_batch_size": args.micro_batch_size, "num_steps": args.steps, "lr": 1e-5,
                     "warmup_ratio": 0.0, "activation_checkpointing": args.activation_checkpointing},
           "eval": {"splits": []}, "output": {"run_dir": str(run_dir), "save_model": False}}
    cfg_path = work / f"{mode}.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    marks = launch_workers(__file__, cfg_path, out, args.ranks, mode)
    shutil.rmtree(work / "runs", ignore_errors=True)  # checkpoints of a 3-step run: hundreds of MB, never reused
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", default=str(REPO / ".cache" / "bench_reference_memory"))
    ap.add_argument("--modes", nargs="+", default=["engine", "cache"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--num-docs", type=int, default=8)
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="train.activation_checkpointing = true in both modes")
    args, _ = ap.parse_known_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    if args.worker:
        sys.exit(worker(args.config, args.out))

    work = Path(args.work_dir)
    world = build_world(work / "world", args.hidden, args.layers, args.vocab, args.seq_len, args.num_docs)
    results = {mode: run_mode(mode, world, work, args) for mode in args.modes}
    mib = lambda kib: kib / 1024  # noqa: E731
    command = "python benchmarks/bench_reference_memory.py " + " ".join(sys.argv[1:])
    print(f"\nGA+KL, {world['num_params'] / 1e6:.1f}M-param Llama (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}), {args.ranks} CPU ranks, ZeRO-3 fp32 ({ZERO.name}), micro-batch {args.micro_batch_size}"
          f" forget + {args.micro_batch_size} retain chunks of {args.seq_len} tokens, {args.steps} steps, "
          f"top-k {args.topk}, activation checkpointing {'on' if args.activation_checkpointing else 'off'}."
          f"\n`{command.strip()}`\n")
    print("| reference | peak RSS rank 0 (MiB) | peak RSS rank 1 (MiB) | peak after engine built | "
          "peak after reference built | run (s) |")
    print("|---|---|---|---|---|---|")
    peaks = {}
    for mode, ranks in results.items():
        peak = [ranks[r]["end"]["VmHWM"] for r in sorted(ranks)]
        peaks[mode] = max(peak)
        cells = [f"{mib(v):.0f}" for v in peak] + [f"{mib(max(ranks[r]['engine_built']['VmHWM'] for r in ranks)):.0f}",
                                                    f"{mib(max(ranks[r]['reference_built']['VmHWM'] for r in ranks)):.0f}",
                                                    f"{max(ranks[r]['seconds'] for r in ranks):.0f}"]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    if "engine" in peaks and "cache" in peaks:
        print(f"\ncache / engine peak (max over ranks): {peaks['cache'] / peaks['engine']:.2f}")
    # What the reference can cost, for scale: its ZeRO-3 weight shard, and one full-vocabulary fp32 tensor of one chunk
    # (its logits; exact KL needs a few of those per retain chunk, the top-k cache reads [seq_len, k] instead).
    print(f"reference weights per rank (fp32 ZeRO-3 shard): {world['num_params'] * 4 / args.ranks / 2**20:.0f} MiB; "
          f"one [seq_len, vocab] fp32 tensor: {args.seq_len * args.vocab * 4 / 2**20:.0f} MiB; "
          f"cached top-{args.topk} per chunk: {args.seq_len * (args.topk * 8 + 4) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
