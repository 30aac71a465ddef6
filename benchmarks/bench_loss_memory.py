"""Peak memory of the loss math alone: row-blocked terms (``dsunlearn.methods.terms``) vs the whole-tensor formulas.

    python benchmarks/bench_loss_memory.py                         # T = 2048, Llama-3's vocabulary (128,256), 1 chunk
    python benchmarks/bench_loss_memory.py --seq-len 1024 --vocab 32000 --dtype float32

Each cell is a fresh process (so no allocation of one cell survives into the next): it makes the logits of one chunk
(``[1, T, V]`` in ``--dtype``, requiring grad, as a model's forward would hand them over; theta_0's log-probs too for
exact KL), resets the RSS high-water mark (``/proc/self/clear_refs``), runs the term's forward and backward, and
reports ``VmHWM`` minus the RSS before the forward, in units of one ``[T, V]`` fp32 tensor. The logits' own gradient
(one ``[T, V]`` tensor in ``--dtype``) is part of every backward and so of every figure. Terms:

- nll: ``terms.chunk_nll`` vs ``log_softmax(logits.float()).gather(...)``, the usual formula;
- kl_exact: ``terms.kl_to_reference`` with theta_0's full distribution vs ``sum p0 (log p0 - log_softmax(x))``;
- kl_top64: the same with theta_0's top-64 vs the whole-tensor top-k form;
- ga_gd_fused: GA+GD on a fused batch of 1 forget + 1 retain chunk (``[2, T, V]`` logits), the way the loop runs
  it: ``terms.split_streams`` (one shared gradient) + ``chunk_nll`` per stream vs ``split`` + the usual formula.
Both implementations agree on value and gradient (asserted in ``tests/unit/test_blocked_loss_math.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


TERMS = ("nll", "kl_exact", "kl_top64", "ga_gd_fused")


def _hwm_mib() -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def _whole_tensor_kl(logits, labels, lp0, ids=None, rest0=None):
    from dsunlearn.methods.terms import chunk_mean, log1mexp, shift_for_next_token, upcast
    shifted, _, mask = shift_for_next_token(upcast(logits), labels)
    logp = shifted.log_softmax(-1)
    if ids is None:
        lp0 = lp0[:, :-1]
        per_position = (lp0.exp() * (lp0 - logp)).sum(-1)
    else:
        lpk = logp.gather(-1, ids[:, :-1])
        per_position = (lp0[:, :-1].exp() * (lp0[:, :-1] - lpk)).sum(-1)
        per_position = per_position + rest0[:, :-1].exp() * (rest0[:, :-1] - log1mexp(lpk.logsumexp(-1)))
    return chunk_mean(per_position, mask.to(per_position.dtype)).mean()


def cell(term: str, impl: str, seq_len: int, vocab: int, dtype: str) -> dict:
    import torch
    from dsunlearn.methods import terms
    torch.manual_seed(0)
    rows = 2 if term == "ga_gd_fused" else 1
    logits = torch.randn(rows, seq_len, vocab, dtype=getattr(torch, dtype)).requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq_len))
    ref = None
    if term.startswith("kl"):
        with torch.no_grad():
            ref = terms.reference_distribution(torch.randn(1, seq_len, vocab), None if term == "kl_exact" else 64)
    before, _ = _hwm_mib()
    Path("/proc/self/clear_refs").write_text("5")
    if term == "ga_gd_fused":
        def nll(part, lab):
            return -part[:, :-1].float().log_softmax(-1).gather(-1, lab[:, 1:, None]).mean()
        if impl == "blocked":
            forget, retain = terms.split_streams(logits, [1, 1])
            loss = -terms.chunk_nll(forget, labels[:1]).mean() + terms.chunk_nll(retain, labels[1:]).mean()
        else:
            forget, retain = logits.split([1, 1])
            loss = -nll(forget, labels[:1]) + nll(retain, labels[1:])
    elif term == "nll":
        if impl == "blocked":
            loss = terms.chunk_nll(logits, labels).mean()
        else:
            lp = logits[:, :-1].float().log_softmax(-1)
            loss = -lp.gather(-1, labels[:, 1:, None]).mean()
    elif impl == "blocked":
        loss = terms.kl_to_reference(logits, labels, *ref)
    else:
        loss = _whole_tensor_kl(logits, labels, *ref)
    loss.backward()
    _, peak = _hwm_mib()
    return {"term": term, "impl": impl, "extra_mib": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--cell", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(cell(*args.cell, args.seq_len, args.vocab, args.dtype)))
        return
    unit = args.seq_len * args.vocab * 4 / 2**20
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    results = {}
    for term in TERMS:
        for impl in ("whole", "blocked"):
            out = subprocess.run([sys.executable, __file__, "--seq-len", str(args.seq_len), "--vocab", str(args.vocab),
                                  "--dtype", args.dtype, "--cell", term, impl],
                                 capture_output=True, text=True, env=env, check=True)
            results[term, impl] = json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]
    print(f"command: `python benchmarks/bench_loss_memory.py {' '.join(sys.argv[1:])}`  ")
    print(f"one chunk of {args.seq_len} tokens, vocabulary {args.vocab}, logits in {args.dtype}; "
          f"unit U = one [T, V] fp32 tensor = {unit:.0f} MiB\n")
    print("| term | whole-tensor formula: MiB (U) | row-blocked: MiB (U) | blocked / whole |")
    print("|---|---|---|---|")
    for term in TERMS:
        w, b = results[term, "whole"], results[term, "blocked"]
        print(f"| {term} | {w:.0f} ({w / unit:.2f}) | {b:.0f} ({b / unit:.2f}) | {b / w:.2f} |")


if __name__ == "__main__":
    main()
