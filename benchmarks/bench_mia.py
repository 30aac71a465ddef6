"""Throughput of the vectorised evaluation suite (split metrics + every MIA score) vs a per-example loop.

    python benchmarks/bench_mia.py                             # 64 chunks x 256 tokens, 2 x Llama 7.3M, vocab 8192
    python benchmarks/bench_mia.py --chunks 16 --seq-len 128   # quick
(with the package installed, or ``PYTHONPATH=.`` from the repo root)

Both sides compute the same numbers for every chunk (asserted equal: ``|a - b| / max(|b|, 1) < 1e-5``): nll_sum,
num_tokens, num_correct, mia_loss, mia_zlib, mia_min_k_{10..60}, mia_min_k_pp_{10..60}, mia_ref (a second, reference Llama).

- vectorised: micro-batches of ``--micro-batch`` right-padded chunks; one target forward + one reference forward per
  micro-batch; ``dsunlearn.eval.metrics.chunk_stats`` on the logits (one log-softmax, one sort for all k).
- per-example loop (what a naive implementation does): for each chunk, one target forward and one reference forward on
  its unpadded tokens (batch 1); then one Python loop over tokens per score family, each calling log_softmax on that
  position's logit vector: (1) NLL + top-1 accuracy, (2) Min-K% (collect log-probs, ``sorted`` once, slice per k),
  (3) Min-K%++ (log_softmax, softmax, mu and sigma over the vocabulary per token, ``sorted`` once, slice per k),
  (4) reference NLL; zlib on the chunk text.

Prints a markdown table: end-to-end (forwards + scores) and scores-only (given the logits) tokens/s for each side.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import zlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsunlearn.eval.metrics import chunk_stats, concat_stats
from dsunlearn.eval.mia import MIN_K_PERCENTS
from dsunlearn.methods.terms import IGNORE_INDEX


def build_model(args, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq_len,
                      initializer_range=0.2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def make_chunks(args):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq_len * 3 // 4, args.seq_len + 1, (args.chunks,), generator=gen).tolist()
    chunks = [torch.randint(0, args.vocab, (n,), generator=gen) for n in lengths]
    texts = [" ".join(map(str, c.tolist())) for c in chunks]
    return chunks, texts


def vectorised_forwards(model, ref_model, chunks, micro_batch, seq_len):
    batches = []
    for start in range(0, len(chunks), micro_batch):
        part = chunks[start:start + micro_batch]
        ids = torch.zeros(len(part), seq_len, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, c in enumerate(part):
            ids[i, :len(c)], attn[i, :len(c)], labels[i, :len(c)] = c, 1, c
        logits = model(input_ids=ids, attention_mask=attn).logits
        ref_logits = ref_model(input_ids=ids, attention_mask=attn).logits
        batches.append((logits, ref_logits, labels, start))
    return batches


def vectorised_scores(batches, texts, micro_batch):
    return concat_stats([chunk_stats(lg, lb, texts=texts[s:s + micro_batch], ref_logits=rl)
                         for lg, rl, lb, s in batches])


def loop_forwards(model, ref_model, chunks):
    return [(model(input_ids=c[None]).logits[0], ref_model(input_ids=c[None]).logits[0]) for c in chunks]


def loop_scores(per_chunk, chunks, texts):
    out = {}
    for (logits, ref_logits), ids, text in zip(per_chunk, chunks, texts):
        n = len(ids) - 1
        # (1) NLL + accuracy
        nll_sum, correct = 0.0, 0
        for t in range(n):
            lp = torch.log_softmax(logits[t], -1)
            nll_sum -= float(lp[ids[t + 1]])
            correct += int(int(logits[t].argmax()) == int(ids[t + 1]))
        nll = nll_sum / n
        # (2) Min-K%
        logps = [float(torch.log_softmax(logits[t], -1)[ids[t + 1]]) for t in range(n)]
        logps.sort()
        # (3) Min-K%++
        zs = []
        for t in range(n):
            lp = torch.log_softmax(logits[t], -1)
            p = lp.exp()
            mu = float((p * lp).sum())
            sigma = math.sqrt(float((p * (lp - mu) ** 2).sum()))
            zs.append((float(lp[ids[t + 1]]) - mu) / sigma)
        zs.sort()
        # (4) reference NLL
        ref_nll = -sum(float(torch.log_softmax(ref_logits[t], -1)[ids[t + 1]]) for t in range(n)) / n
        row = {"nll_sum": nll_sum, "num_tokens": n, "num_correct": correct, "mia_loss": -nll,
               "mia_zlib": -nll / len(zlib.compress(text.encode())), "mia_ref": ref_nll - nll}
        for k in MIN_K_PERCENTS:
            n_k = max(1, n * k // 100)
            row[f"mia_min_k_{k}"] = sum(logps[:n_k]) / n_k
            row[f"mia_min_k_pp_{k}"] = sum(zs[:n_k]) / n_k
        for key, v in row.items():
            out.setdefault(key, []).append(v)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def timed(fn, *a):
    t0 = time.perf_counter()
    result = fn(*a)
    return result, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="best of N, the two sides interleaved (shared machines)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, ref_model = build_model(args, 0), build_model(args, 1)
    num_params = sum(t.numel() for t in model.parameters())
    chunks, texts = make_chunks(args)
    num_tokens = sum(len(c) - 1 for c in chunks)

    with torch.inference_mode():
        # Warm-up (allocator, kernels) on two chunks.
        loop_scores(loop_forwards(model, ref_model, chunks[:2]), chunks[:2], texts[:2])
        vectorised_scores(vectorised_forwards(model, ref_model, chunks[:2], 2, args.seq_len), texts[:2], 2)

        vec_fwd = vec_score = loop_fwd = loop_score = math.inf
        for _ in range(args.repeats):
            vec_batches, fwd = timed(vectorised_forwards, model, ref_model, chunks, args.micro_batch, args.seq_len)
            vec, score = timed(vectorised_scores, vec_batches, texts, args.micro_batch)
            del vec_batches
            vec_fwd, vec_score = min(vec_fwd, fwd), min(vec_score, score)
            loop_logits, fwd = timed(loop_forwards, model, ref_model, chunks)
            ref, score = timed(loop_scores, loop_logits, chunks, texts)
            del loop_logits
            loop_fwd, loop_score = min(loop_fwd, fwd), min(loop_score, score)

    assert set(vec) == set(ref), (sorted(vec), sorted(ref))
    # Relative error: nll_sum is a sum over ~250 tokens; the per-token scores are O(1).
    errors = {k: float(((vec[k].double() - ref[k]).abs() / ref[k].abs().clamp_min(1.0)).max()) for k in ref}
    worst = max(errors.values())
    assert worst < 1e-5, f"vectorised and loop disagree: {errors}"

    def tps(seconds):
        return f"{num_tokens / seconds:,.0f}"

    rows = [("per-example loop", loop_fwd, loop_score), ("vectorised", vec_fwd, vec_score)]
    print(f"command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`  ")
    print(f"date: {datetime.date.today().isoformat()}; machine: {platform.machine()} {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"load average at the end {os.getloadavg()[0]:.1f}; best of {args.repeats}  ")
    print(f"model: 2 x Llama {num_params / 1e6:.1f}M params (target + reference), vocab {args.vocab}; "
          f"{args.chunks} chunks, {args.seq_len} max tokens, {num_tokens} scored tokens; "
          f"micro-batch {args.micro_batch}; max relative |vectorised - loop| over all scores = {worst:.1e}\n")
    print("| implementation | forwards s | scores s | total s | end-to-end tokens/s | scores-only tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, fwd, score in rows:
        print(f"| {name} | {fwd:.2f} | {score:.2f} | {fwd + score:.2f} | {tps(fwd + score)} | {tps(score)} |")
    print(f"| speed-up | {loop_fwd / vec_fwd:.1f}x | {loop_score / vec_score:.1f}x | "
          f"{(loop_fwd + loop_score) / (vec_fwd + vec_score):.1f}x | | |")


if __name__ == "__main__":
    main()
