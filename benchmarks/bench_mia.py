"""Throughput of the vectorised evaluation suite (split metrics + every MIA score) vs a per-example loop.

    python benchmarks/bench_mia.py                             # 8 chunks x 256 tokens, 2 x Llama 7.3M, vocab 8192
    python benchmarks/bench_mia.py --chunks 4 --seq-len 128    # quick
(with the package installed, or ``PYTHONPATH=.`` from the repo root)

All three designs compute the same numbers for every chunk (asserted equal: ``|a - b| / max(|b|, 1) < 1e-5``): nll_sum,
num_tokens, num_correct, mia_loss, mia_zlib, mia_min_k_{10..60}, mia_min_k_pp_{10..60}, mia_ref (a second, reference Llama).

- vectorised: micro-batches of ``--micro-batch`` right-padded chunks; one target forward + one reference forward per
  micro-batch; ``dsunlearn.eval.metrics.chunk_stats`` on the logits (one log-softmax, one sort for all k).
- (A) shared-forward per-token loop (a strong baseline): for each chunk, ONE target forward and ONE reference forward on
  its unpadded tokens (batch 1), shared by every score; then one Python loop over tokens per score family, each calling
  log_softmax on that position's logit vector: (1) NLL + top-1 accuracy, (2) Min-K% (collect log-probs, ``sorted``
  once, slice per k), (3) Min-K%++ (log_softmax, softmax, mu and sigma over the vocabulary per token, ``sorted`` once,
  slice per k), (4) reference NLL; zlib on the chunk text.
- (B) per-attack per-example forwards (how MIA toolkits are commonly written): each attack is its own per-example
  routine that runs its own batch-1 forward of the target model on the chunk's unpadded tokens and scores it with
  plain per-example tensor ops (log_softmax over the whole chunk, gather, sort; no per-token Python loop):
  LOSS (1 target forward; it also yields nll_sum / num_tokens / num_correct, so the split metrics cost no extra
  forward), zlib (1), Min-K% (1 forward for all k: the attack takes the k list), Min-K%++ (1 forward for all k),
  reference attack (1 target + 1 reference forward). Per chunk: 5 target + 1 reference = 6 forwards (A: 1 + 1).

Designs are interleaved (A, B, vectorised, repeat) because the machine may be shared; every time is the median of
``--repeats`` runs, and the 1-minute load average (``os.getloadavg``) is printed before each repeat and at the end.
Prints a markdown table: end-to-end (forwards + scores) and scores-only (given the logits) tokens/s for each design,
and the vectorised suite's speed-up over (A) and over (B) side by side.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
import zlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsunlearn.eval.metrics import chunk_stats, concat_stats
from dsunlearn.eval.mia import MIN_K_PERCENTS, VARIANCE_FLOOR
from dsunlearn.methods.terms import IGNORE_INDEX


DEVICE = torch.device("cpu")


def sync():
    """Wait for queued accelerator work, so that wall-clock times cover it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def build_model(args, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq_len,
                      initializer_range=0.2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval().to(DEVICE)


def make_chunks(args):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq_len * 3 // 4, args.seq_len + 1, (args.chunks,), generator=gen).tolist()
    chunks = [torch.randint(0, args.vocab, (n,), generator=gen).to(DEVICE) for n in lengths]
    texts = [" ".join(map(str, c.tolist())) for c in chunks]
    return chunks, texts


def vectorised_forwards(model, ref_model, chunks, micro_batch, seq_len):
    batches = []
    for start in range(0, len(chunks), micro_batch):
        part = chunks[start:start + micro_batch]
        ids = torch.zeros(len(part), seq_len, dtype=torch.long, device=DEVICE)
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


# ---- (B) per-attack per-example forwards: one routine per attack, each with its own batch-1 forward. ----
class Clock:
    """Accumulates forward time and score time separately across B's attack routines."""

    def __init__(self):
        self.fwd = self.score = 0.0

    def forward(self, model, ids):
        t0 = time.perf_counter()
        logits = model(input_ids=ids[None]).logits[0]
        sync()
        self.fwd += time.perf_counter() - t0
        return logits


def _target_logprobs(logits, ids):
    """fp32 log-softmax of the predicting positions and the picked next-token log-probs (per-example tensor ops)."""
    logp = torch.log_softmax(logits[:-1].float(), -1)
    return logp, logp.gather(-1, ids[1:, None]).squeeze(-1)


def _min_k(values, percents):
    ordered = values.double().sort().values
    n = ordered.numel()
    return {k: float(ordered[:max(1, n * k // 100)].mean()) for k in percents}


def attack_loss(clock, model, ids):
    logits = clock.forward(model, ids)
    t0 = time.perf_counter()
    _, picked = _target_logprobs(logits, ids)
    nll_sum = -float(picked.double().sum())
    n = picked.numel()
    out = {"nll_sum": nll_sum, "num_tokens": n, "num_correct": int((logits[:-1].argmax(-1) == ids[1:]).sum()),
           "mia_loss": -nll_sum / n}
    clock.score += time.perf_counter() - t0
    return out


def attack_zlib(clock, model, ids, text):
    logits = clock.forward(model, ids)
    t0 = time.perf_counter()
    _, picked = _target_logprobs(logits, ids)
    out = {"mia_zlib": float(picked.double().mean()) / len(zlib.compress(text.encode()))}
    clock.score += time.perf_counter() - t0
    return out


def attack_min_k(clock, model, ids, percents):
    logits = clock.forward(model, ids)
    t0 = time.perf_counter()
    _, picked = _target_logprobs(logits, ids)
    out = {f"mia_min_k_{k}": v for k, v in _min_k(picked, percents).items()}
    clock.score += time.perf_counter() - t0
    return out


def attack_min_k_pp(clock, model, ids, percents):
    logits = clock.forward(model, ids)
    t0 = time.perf_counter()
    logp, picked = _target_logprobs(logits, ids)
    probs = logp.exp()
    mu = (probs * logp).sum(-1)
    sigma = (probs * (logp - mu[:, None]) ** 2).sum(-1).clamp_min(VARIANCE_FLOOR).sqrt()
    out = {f"mia_min_k_pp_{k}": v for k, v in _min_k((picked - mu) / sigma, percents).items()}
    clock.score += time.perf_counter() - t0
    return out


def attack_ref(clock, model, ref_model, ids):
    logits, ref_logits = clock.forward(model, ids), clock.forward(ref_model, ids)
    t0 = time.perf_counter()
    nll = -float(_target_logprobs(logits, ids)[1].double().mean())
    ref_nll = -float(_target_logprobs(ref_logits, ids)[1].double().mean())
    out = {"mia_ref": ref_nll - nll}
    clock.score += time.perf_counter() - t0
    return out


def per_attack_suite(model, ref_model, chunks, texts):
    """Returns (scores, forward seconds, score seconds); each attack loops over the chunks on its own."""
    clock, rows = Clock(), [{} for _ in chunks]
    for row, ids in zip(rows, chunks):
        row.update(attack_loss(clock, model, ids))
    for row, ids, text in zip(rows, chunks, texts):
        row.update(attack_zlib(clock, model, ids, text))
    for row, ids in zip(rows, chunks):
        row.update(attack_min_k(clock, model, ids, MIN_K_PERCENTS))
    for row, ids in zip(rows, chunks):
        row.update(attack_min_k_pp(clock, model, ids, MIN_K_PERCENTS))
    for row, ids in zip(rows, chunks):
        row.update(attack_ref(clock, model, ref_model, ids))
    scores = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in rows[0]}
    return scores, clock.fwd, clock.score


def timed(fn, *a):
    t0 = time.perf_counter()
    result = fn(*a)
    sync()
    return result, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3,
                   help="median of N, the designs interleaved A, B, vectorised (shared machines)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the models and the scoring run (default: cuda when available)")
    args = p.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, ref_model = build_model(args, 0), build_model(args, 1)
    num_params = sum(t.numel() for t in model.parameters())
    chunks, texts = make_chunks(args)
    num_tokens = sum(len(c) - 1 for c in chunks)

    times = {name: ([], []) for name in ("A", "B", "vec")}  # name -> (forward seconds, score seconds) per repeat
    loads = []
    with torch.inference_mode():
        # Warm-up (allocator, kernels) on two chunks.
        loop_scores(loop_forwards(model, ref_model, chunks[:2]), chunks[:2], texts[:2])
        per_attack_suite(model, ref_model, chunks[:2], texts[:2])
        vectorised_scores(vectorised_forwards(model, ref_model, chunks[:2], 2, args.seq_len), texts[:2], 2)

        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            loop_logits, fwd = timed(loop_forwards, model, ref_model, chunks)
            ref_a, score = timed(loop_scores, loop_logits, chunks, texts)
            del loop_logits
            times["A"][0].append(fwd), times["A"][1].append(score)
            ref_b, fwd, score = per_attack_suite(model, ref_model, chunks, texts)
            times["B"][0].append(fwd), times["B"][1].append(score)
            vec_batches, fwd = timed(vectorised_forwards, model, ref_model, chunks, args.micro_batch, args.seq_len)
            vec, score = timed(vectorised_scores, vec_batches, texts, args.micro_batch)
            del vec_batches
            times["vec"][0].append(fwd), times["vec"][1].append(score)
    loads.append(os.getloadavg()[0])

    # Relative error: nll_sum is a sum over ~250 tokens; the per-token scores are O(1).
    worst = {}
    for name, ref in (("A", ref_a), ("B", ref_b)):
        assert set(vec) == set(ref), (name, sorted(vec), sorted(ref))
        errors = {k: float(((vec[k].double().cpu() - ref[k].cpu()).abs() / ref[k].cpu().abs().clamp_min(1.0)).max())
                  for k in ref}
        worst[name] = max(errors.values())
        assert worst[name] < 1e-5, f"vectorised and baseline ({name}) disagree: {errors}"

    med = {name: (statistics.median(f), statistics.median(s)) for name, (f, s) in times.items()}
    vf, vs = med["vec"]

    def tps(seconds):
        return f"{num_tokens / seconds:,.0f}"

    print(f"command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`  ")
    print(f"date: {datetime.date.today().isoformat()}; machine: {platform.machine()} {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {DEVICE}; median of {args.repeats}, "
          f"designs interleaved A, B, vectorised; 1-min load average before each repeat and at the end: "
          f"{', '.join(f'{x:.1f}' for x in loads)}  ")
    print(f"model: 2 x Llama {num_params / 1e6:.1f}M params (target + reference), vocab {args.vocab}; "
          f"{args.chunks} chunks, {args.seq_len} max tokens, {num_tokens} scored tokens; "
          f"micro-batch {args.micro_batch}; max relative |vectorised - A| = {worst['A']:.1e}, "
          f"|vectorised - B| = {worst['B']:.1e} over all scores\n")
    print("| implementation | forwards per chunk (target + ref) | forwards s | scores s | total s | end-to-end tokens/s "
          "| scores-only tokens/s | vectorised speed-up: forwards / scores / end-to-end |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("(A) shared-forward per-token loop", "1 + 1, batch 1", "A"),
            ("(B) per-attack per-example forwards", "5 + 1, batch 1", "B"),
            ("vectorised", f"1 + 1 per micro-batch of {args.micro_batch}", "vec")]
    for label, fwds, name in rows:
        f, s = med[name]
        speed = "—" if name == "vec" else f"{f / vf:.1f}x / {s / vs:.1f}x / **{(f + s) / (vf + vs):.1f}x**"
        print(f"| {label} | {fwds} | {f:.2f} | {s:.2f} | {f + s:.2f} | {tps(f + s)} | {tps(s)} | {speed} |")


if __name__ == "__main__":
    main()
