"""Generated tokens per second: batched greedy decoding (``eval/generate.py``) against one prompt at a time, at 1 and
2 CPU ranks under ZeRO-3.

    python benchmarks/bench_generate.py                 # 16 prompts, batch 16 vs 1, 1 and 2 ranks
    python benchmarks/bench_generate.py --prompts 32 --new-tokens 64 --ranks 1

What it runs: a Llama of the demo world's shape (``dsunlearn/toy.py``'s ``make_tiny_llama``; hidden 128, 4 layers,
a 4096-token vocabulary, random weights: the speed does not depend on what the weights say), loaded as the frozen
ZeRO-3 engine the evaluation uses (``stage3_param_persistence_threshold: 0``, so every forward gathers every
parameter). The prompts are 32 tokens each; EOS is disabled so that every prompt decodes ``--new-tokens`` tokens.
Both modes go through ``greedy_continuations``: ``batch 16`` is what the evaluation does, ``batch 1`` is the
one-prompt-at-a-time ``generate`` loop (each prompt its own call, dealt to the ranks the same way). Each mode runs
once untimed (warm-up), then ``--repeats`` times; the table gives the median. The ratio is measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_model(out: Path, vocab: int) -> Path:
    from dsunlearn.toy import generate_documents, make_tiny_llama, train_toy_tokenizer
    tokenizer = train_toy_tokenizer(generate_documents(64, seed=0, vocab_size=2000), str(out), vocab_size=vocab)
    return Path(make_tiny_llama(str(out), tokenizer, hidden_size=128, num_layers=4, num_heads=4, seq_len=256))


def worker(args) -> None:
    import torch
    from dsunlearn import engine as E
    from dsunlearn.config import load_run_config
    from dsunlearn.eval.generate import greedy_continuations
    from dsunlearn.eval.runner import frozen_engine
    from dsunlearn.zero import resolve_configs
    E.init_distributed()
    cfg = load_run_config(None, [f"model.path={args.model}", "data.seq_len=256", "train.micro_batch_size=1"])
    ds_config = resolve_configs(cfg, str(REPO / "ds_configs" / "zero3_cpu_test.json"), E.world_size())
    g = torch.Generator().manual_seed(0)
    with frozen_engine(cfg, ds_config, str(args.model)) as engine:
        vocab = engine.module.config.vocab_size
        prompts = [torch.randint(3, vocab, (32,), generator=g).tolist() for _ in range(args.prompts)]
        results = {}
        for batch in (args.batch, 1):
            greedy_continuations(engine, prompts, args.new_tokens, pad_id=0, eos_id=None, batch_size=batch)
            times = []
            for _ in range(args.repeats):
                E.barrier()
                start = time.perf_counter()
                out = greedy_continuations(engine, prompts, args.new_tokens, pad_id=0, eos_id=None, batch_size=batch)
                E.barrier()
                times.append(time.perf_counter() - start)
            tokens = sum(len(o) for o in out)
            results[batch] = {"seconds": statistics.median(times), "tokens": tokens,
                              "tokens_per_second": tokens / statistics.median(times)}
    if E.is_main():
        Path(args.out).write_text(json.dumps(results))


def launch(ranks: int, model: Path, out: Path, args) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    script = [str(Path(__file__).resolve()), "--worker", "--model", str(model), "--out", str(out),
              "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--batch", str(args.batch),
              "--repeats", str(args.repeats)]
    cmd = ([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks)] if ranks > 1
           else [sys.executable]) + script
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stdout[-2000:] + p.stderr[-3000:])
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", args.vocab)
        print(f"{args.prompts} prompts of 32 tokens, {args.new_tokens} new tokens each, greedy, ZeRO-3 on CPU "
              f"(median of {args.repeats})\n")
        print("| ranks | batch | seconds | generated tokens/s | speed-up over batch 1 |")
        print("|---|---|---|---|---|")
        for ranks in args.ranks:
            r = launch(ranks, model, Path(tmp) / f"r{ranks}.json", args)
            batched, single = r[str(args.batch)], r["1"]
            for batch, row in ((args.batch, batched), (1, single)):
                print(f"| {ranks} | {batch} | {row['seconds']:.2f} | {row['tokens_per_second']:.0f} | "
                      f"{row['tokens_per_second'] / single['tokens_per_second']:.2f}x |")


if __name__ == "__main__":
    main()
