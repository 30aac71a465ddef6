"""Do forget-specific token rows exist in a vocabulary? The token-row edit's selection (``token_rows``, τ = 3) on a
tokenizer's counts of the forget and retain text, against a null: retain documents drawn at random (seeded) until
they hold as many tokens as the forget set, put through the same rule as if they were the forget set.

    python benchmarks/token_rows_vocab.py --tokenizer dsunlearn/demo/pretrained/original \\
        --forget .cache/demo_world/world/forget.jsonl --retain .cache/demo_world/world/retain.jsonl
    python benchmarks/token_rows_vocab.py --tokenizer .cache/smollm2_pair/original \\
        --forget .cache/smollm2_pair/data/forget.jsonl --retain .cache/smollm2_pair/data/train.jsonl

Prints one JSON line: the vocabulary size, rows selected, the share of the forget text's tokens they cover, and the
same for the null draws (mean over ``--draws``). A vocabulary with forget-specific rows selects a share clearly above
the null's; one shared across domains selects about what a random retain sample does. Counts are over each
document's tokens without special tokens (the method counts chunks, with the EOS: the same up to one token per
document).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dsunlearn.methods.phased import forget_specific_tokens  # noqa: E402


def token_lists(tokenizer, path: str) -> list[list[int]]:
    texts = [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def counts(docs: list[list[int]], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor([t for d in docs for t in d], dtype=torch.long), minlength=vocab)


def selection(forget: list[list[int]], retain: list[list[int]], vocab: int, threshold: float) -> dict:
    cf, cr = counts(forget, vocab), counts(retain, vocab)
    rows = forget_specific_tokens(cf, cr, threshold)
    return {"rows": int(rows.sum()), "forget_token_share": round(float(cf[rows].sum() / cf.sum()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--forget", required=True)
    ap.add_argument("--retain", required=True)
    ap.add_argument("--threshold", type=float, default=3.0)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = len(tokenizer)
    forget, retain = token_lists(tokenizer, args.forget), token_lists(tokenizer, args.retain)
    out = {"tokenizer": args.tokenizer, "vocab": vocab, "threshold": args.threshold,
           "forget_tokens": sum(map(len, forget)), "retain_tokens": sum(map(len, retain)),
           "forget": selection(forget, retain, vocab, args.threshold)}
    target, nulls = out["forget_tokens"], []
    for draw in range(args.draws):
        order = list(range(len(retain)))
        random.Random(args.seed + draw).shuffle(order)
        picked, total = [], 0
        for i in order:
            if total >= target:
                break
            picked.append(i)
            total += len(retain[i])
        chosen = set(picked)
        rest = [retain[i] for i in order if i not in chosen]
        nulls.append(selection([retain[i] for i in picked], rest, vocab, args.threshold))
    out["null"] = {"rows": sum(n["rows"] for n in nulls) / len(nulls),
                   "forget_token_share": round(sum(n["forget_token_share"] for n in nulls) / len(nulls), 4),
                   "draws": len(nulls)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
