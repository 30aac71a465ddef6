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
                min_k_percents: Sequence[int] = MIN_K_PERCENTS, memorisation_prefix: int = 0,
                block_elements: int | None = None) -> dict[str, torch.Tensor]:
    """Per-chunk statistics from one forward: ``{name: [B] tensor}`` on the logits' device.

    ``logits [B,T,V]`` and ``labels [B,T]`` follow ``terms`` (labels aligned with ``input_ids``, -100 ignored, logits
    at t predict ``labels[t+1]``). Keys: ``nll_sum`` (float64, summed next-token NLL), ``num_tokens`` and
    ``num_correct`` (int64, counted tokens and correct top-1 predictions, argmax ties to the lowest id), and the
    ``mia_*`` scores of ``mia.scores_from_tokens`` (``texts`` enables ``mia_zlib``; ``ref_logits`` or ``ref_nll``
    enables ``mia_ref``). ``memorisation_prefix > 0`` adds ``memorisation_stats``. ``block_elements``: see
    ``mia.token_stats``. Run it under ``torch.no_grad()``.
    """
    tokens = token_stats(logits, labels, block_elements=block_elements)
    stats = {
        "nll_sum": -tokens.logprob.double().sum(-1),
        "num_tokens": tokens.mask.sum(-1, dtype=torch.int64),
        "num_correct": tokens.correct.sum(-1, dtype=torch.int64),
    }
    ref = resolve_ref_nll(ref_logits, ref_nll, labels, block_elements=block_elements)
    stats.update(scores_from_tokens(tokens, texts=texts, ref_nll=ref, min_k_percents=min_k_percents))
    if memorisation_prefix > 0:
        stats.update(memorisation_stats(tokens, memorisation_prefix))
    return stats


def memorisation_stats(tokens, prefix: int) -> dict[str, torch.Tensor]:
    """Teacher-forced verbatim memorisation of each chunk's continuation: the first ``prefix`` tokens are the prompt,
    the counted tokens after them the continuation ``y`` (predicted from the true text before each, one forward).

    - ``mem_tokens``: ``|y|`` (0 when the chunk has no token after the prompt: left out of the split means);
    - ``mem_correct``: how many tokens of ``y`` the argmax predicts. Their share is *exact memorisation*
      (Tirumala et al. 2022, arXiv 2205.10770);
    - ``mem_suffix``: the longest run of correct argmax predictions that ends at the last token of ``y``, ``|y| - k``
      for the smallest ``k`` with ``argmax[k:] == y[k:]``. ``mem_suffix / |y|`` is *extraction strength*
      ``1 - k/|y|`` (Carlini et al. 2021, as open-unlearning reports it). A wrong last token gives 0; open-unlearning's
      code reports ``1/|y|`` there (its ``k`` stops at ``|y| - 1``).
    """
    # Position t of the shifted stats predicts token t + 1: the continuation starts at token ``prefix``.
    num_pos = tokens.mask.shape[-1]
    in_y = tokens.mask & (torch.arange(num_pos, device=tokens.mask.device) >= prefix - 1)
    correct = tokens.correct & in_y
    # A position is in the matching suffix when every continuation token from it on is predicted (other positions
    # count as matching, so padding after the chunk does not break the run).
    ok = (correct | ~in_y).flip(-1).to(torch.int64).cumprod(-1).flip(-1).bool()
    return {"mem_tokens": in_y.sum(-1, dtype=torch.int64), "mem_correct": correct.sum(-1, dtype=torch.int64),
            "mem_suffix": (ok & in_y).sum(-1, dtype=torch.int64)}


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
    ``accuracy`` (top-1 next-token), ``num_tokens``, ``num_chunks``; with ``memorisation_stats``,
    ``exact_memorisation`` and ``extraction_strength``: the mean over chunks with a continuation of each chunk's
    ``mem_correct / mem_tokens`` and ``mem_suffix / mem_tokens`` (None when no chunk has one)."""
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
        **memorisation_metrics(stats),
    }


def memorisation_metrics(stats: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
    if "mem_tokens" not in stats:
        return {}
    has = stats["mem_tokens"] > 0
    if not bool(has.any()):
        return {"exact_memorisation": None, "extraction_strength": None}
    size = stats["mem_tokens"][has].double()
    return {"exact_memorisation": float((stats["mem_correct"][has] / size).mean()),
            "extraction_strength": float((stats["mem_suffix"][has] / size).mean())}
