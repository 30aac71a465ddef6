"""Split metrics (token-weighted loss, perplexity, top-1 accuracy) from per-chunk statistics of one forward.

``chunk_stats`` turns one forward's logits into ``[B]`` tensors: additive sums and counts for the metrics plus every
membership score (``mia.py``). Because nothing in them depends on which other chunks shared the batch, the per-chunk
stats of several batches or ranks concatenated with ``concat_stats`` aggregate (``split_metrics``) to exactly what one
process scoring the whole split would report. Sums are float64 so the order of accumulation does not show.

Note the split loss here is token-weighted (total NLL / total tokens), the usual evaluation loss and the one whose
``exp`` is perplexity; the training objective in ``terms.token_nll`` is the mean of per-chunk means instead.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from dsunlearn.eval.mia import MIN_K_PERCENTS, resolve_ref_nll, scores_from_tokens, token_stats


def chunk_stats(logits: torch.Tensor, labels: torch.Tensor, *, texts: Sequence[str | bytes] | None = None,
                ref_logits: torch.Tensor | None = None, ref_nll: torch.Tensor | None = None,
                min_k_percents: Sequence[int] = MIN_K_PERCENTS,
                block_elements: int | None = None) -> dict[str, torch.Tensor]:
    """Per-chunk statistics from one forward: ``{name: [B] tensor}`` on the logits' device.

    ``logits [B,T,V]`` and ``labels [B,T]`` follow ``terms`` (labels aligned with ``input_ids``, -100 ignored, logits
    at t predict ``labels[t+1]``). Keys: ``nll_sum`` (float64, summed next-token NLL), ``num_tokens`` and
    ``num_correct`` (int64, counted tokens and correct top-1 predictions, argmax ties to the lowest id), and the
    ``mia_*`` scores of ``mia.scores_from_tokens`` (``texts`` enables ``mia_zlib``; ``ref_logits`` or ``ref_nll``
    enables ``mia_ref``). ``block_elements``: see ``mia.token_stats``. Run it under ``torch.no_grad()``.
    """
    tokens = token_stats(logits, labels, block_elements=block_elements)
    stats = {
        "nll_sum": -tokens.logprob.double().sum(-1),
        "num_tokens": tokens.mask.sum(-1, dtype=torch.int64),
        "num_correct": tokens.correct.sum(-1, dtype=torch.int64),
    }
    ref = resolve_ref_nll(ref_logits, ref_nll, labels, block_elements=block_elements)
    stats.update(scores_from_tokens(tokens, texts=texts, ref_nll=ref, min_k_percents=min_k_percents))
    return stats


def concat_stats(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-chunk stats of several batches (or ranks, after an all-gather) along the chunk axis."""
    if not parts:
        raise ValueError("no per-chunk stats to concatenate")
    keys = set(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if set(part) != keys:
            raise ValueError(f"part {i} has keys {sorted(part)}, part 0 has {sorted(keys)}")
    return {k: torch.cat([p[k].detach() for p in parts]) for k in parts[0]}


def split_metrics(stats: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Aggregate per-chunk stats of one split: ``loss`` (token-weighted mean NLL), ``perplexity`` (``exp(loss)``),
    ``accuracy`` (top-1 next-token), ``num_tokens``, ``num_chunks``."""
    num_tokens = int(stats["num_tokens"].sum())
    if num_tokens == 0:
        raise ValueError("the split has no counted token (every label is -100)")
    loss = float(stats["nll_sum"].double().sum()) / num_tokens
    return {
        "loss": loss,
        # Gradient ascent can push the forget loss past exp's float range (~709): report inf, not OverflowError.
        "perplexity": math.exp(loss) if loss < 700.0 else math.inf,
        "accuracy": int(stats["num_correct"].sum()) / num_tokens,
        "num_tokens": num_tokens,
        "num_chunks": int(stats["num_tokens"].numel()),
    }
