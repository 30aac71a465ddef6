"""Membership-inference scores per chunk, all from the one forward pass that the split metrics use.

Sign convention for every score: **higher = "more likely a member"** (the model finds the chunk easier than it should).
Scores are float64 ``[B]`` tensors; a chunk with no counted token gets NaN (there is nothing to score), which
``attack_report`` rejects with a clear error rather than ranking it silently.

Scores (keys of ``membership_scores``):
- ``mia_loss``: LOSS attack (Yeom et al., CSF 2018): ``-mean token NLL``.
- ``mia_zlib``: zlib ratio (Carlini et al., USENIX Security 2021, arXiv:2012.07805): the paper ranks by
  log-perplexity / zlib entropy, low = memorised; here ``-mean token NLL / len(zlib.compress(text))`` (bytes, default
  level), as in the reference code of the Min-K% papers. Needs each chunk's text.
- ``mia_min_k_{k}``: Min-K% Prob (Shi et al., ICLR 2024, arXiv:2310.16789): mean of the lowest k% next-token log-probs.
- ``mia_min_k_pp_{k}``: Min-K%++ (Zhang et al., 2024, arXiv:2404.02936): per token
  ``(log p(x_t) - mu_t) / sigma_t`` with ``mu_t = E_{z~p(.|x<t)} log p(z)``, ``sigma_t^2 = Var_{z~p(.|x<t)} log p(z)``;
  then the mean of the lowest k%.
- ``mia_ref``: reference-model calibration (Carlini et al. 2021; Watson et al., ICLR 2022): ``ref NLL - target NLL``.

Min-k selection counts only a chunk's counted tokens: ``n_k = max(1, floor(n * k / 100))`` of its own ``n`` counted
tokens (floor as in both papers' code, at least one token).
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from dsunlearn.methods.terms import chunk_nll, row_blocks, shift_for_next_token

MIN_K_PERCENTS = (10, 20, 30, 40, 50, 60)
"""The k values (in percent) reported by both Min-K% papers."""

VARIANCE_FLOOR = 1e-12
"""Floor on sigma_t^2 in Min-K%++: a one-hot next-token distribution has zero variance (and then log p = mu = 0)."""

FPR_TARGETS = (0.01, 0.05)


class TokenStats(NamedTuple):
    """Per-token quantities of one forward, ``[B, N]`` each (``N = T - 1``); entries where ``mask`` is False are 0."""
    logprob: torch.Tensor
    """fp32 ``log p(labels[t+1] | x<=t)``."""
    zscore: torch.Tensor
    """fp32 Min-K%++ statistic ``(log p(x_t) - mu_t) / sigma_t``."""
    correct: torch.Tensor
    """bool: the top-1 prediction (argmax, ties to the lowest id) equals the target."""
    mask: torch.Tensor
    """bool: the target counts."""


def token_stats(logits: torch.Tensor, labels: torch.Tensor, *, block_elements: int | None = None) -> TokenStats:
    """Everything the metrics and the scores need from the ``[B,T,V]`` logits, in one pass over row blocks.

    Same alignment and fp32 rule as ``terms.token_logprobs`` (whose ``shift_for_next_token`` it uses), but the full
    log-softmax is needed for Min-K%++, so it is computed here once per block of ``block_elements`` logit entries and
    dropped: peak extra memory is a few fp32 blocks, not copies of the logits. The per-row math does not depend on
    the blocking.
    """
    shifted, targets, mask = shift_for_next_token(logits, labels)
    mask = mask.bool()
    batch, num_pos, vocab = shifted.shape
    out = [torch.zeros(batch, num_pos, dtype=torch.float32, device=logits.device) for _ in range(2)]
    correct = torch.zeros(batch, num_pos, dtype=torch.bool, device=logits.device)
    for bs, ts in row_blocks(batch, num_pos, vocab, block_elements, logits.device):
        block, target = shifted[bs, ts], targets[bs, ts]
        logp = torch.log_softmax(block.float(), dim=-1)
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        out[0][bs, ts] = picked
        out[1][bs, ts] = _min_k_plus_plus(logp, picked)
        correct[bs, ts] = block.argmax(-1) == target
    logprob, zscore = (t.masked_fill(~mask, 0.0) for t in out)
    return TokenStats(logprob=logprob, zscore=zscore, correct=correct & mask, mask=mask)


def _min_k_plus_plus(logp: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    # sigma^2 as sum_z p(z) (log p(z) - mu)^2, not E[log^2 p] - mu^2, which cancels catastrophically in fp32 for flat
    # distributions.
    probs = logp.exp()
    mu = torch.einsum("...v,...v->...", probs, logp)
    centred = logp - mu.unsqueeze(-1)
    centred.square_().mul_(probs)
    return (picked - mu) / centred.sum(-1).clamp_min(VARIANCE_FLOOR).sqrt()


def min_k_mean(values: torch.Tensor, mask: torch.Tensor,
               percents: Sequence[int] = MIN_K_PERCENTS) -> dict[int, torch.Tensor]:
    """Mean of each chunk's lowest k% counted values, for every k at once (one sort): ``{k: [B] float64}``.

    ``n_k = max(1, floor(n * k / 100))`` of the chunk's ``n`` counted values; NaN where ``n == 0``.
    """
    for k in percents:
        if not 0 < k <= 100:
            raise ValueError(f"min-k percent must be in (0, 100], got {k}")
    counted = mask.sum(-1)
    if values.size(-1) == 0:  # T == 1: no position at all
        return {k: torch.full(counted.shape, float("nan"), dtype=torch.float64, device=values.device) for k in percents}
    # Masked values sort last (+inf) so the first n_k sorted entries are always counted ones.
    ordered = values.double().masked_fill(~mask, float("inf")).sort(dim=-1).values.cumsum(dim=-1)
    out = {}
    for k in percents:
        n_k = torch.div(counted * k, 100, rounding_mode="floor").clamp_min(1)
        mean = ordered.gather(-1, (n_k - 1).unsqueeze(-1)).squeeze(-1) / n_k
        out[k] = mean.masked_fill(counted == 0, float("nan"))
    return out


def zlib_lengths(texts: Sequence[str | bytes]) -> torch.Tensor:
    """``len(zlib.compress(text))`` in bytes per chunk (``str`` is UTF-8 encoded), ``[B]`` float64."""
    return torch.tensor([len(zlib.compress(t.encode("utf-8") if isinstance(t, str) else bytes(t))) for t in texts],
                        dtype=torch.float64)


def scores_from_tokens(tokens: TokenStats, *, texts: Sequence[str | bytes] | None = None,
                       ref_nll: torch.Tensor | None = None,
                       min_k_percents: Sequence[int] = MIN_K_PERCENTS) -> dict[str, torch.Tensor]:
    """Every membership score from one forward's ``token_stats`` (see the module docstring for the keys).

    ``texts``: the decoded text (or bytes) of each chunk, for the zlib score (skipped when ``None``).
    ``ref_nll``: the reference model's mean token NLL per chunk (``terms.chunk_nll`` of its logits, or from a cache),
    for the reference score (skipped when ``None``).
    """
    batch = tokens.mask.size(0)
    counted = tokens.mask.sum(-1)
    nll = (-tokens.logprob.double().sum(-1) / counted.clamp_min(1)).masked_fill(counted == 0, float("nan"))
    scores = {"mia_loss": -nll}
    if texts is not None:
        if len(texts) != batch:
            raise ValueError(f"got {len(texts)} texts for {batch} chunks")
        scores["mia_zlib"] = -nll / zlib_lengths(texts).to(nll.device)
    for k, v in min_k_mean(tokens.logprob, tokens.mask, min_k_percents).items():
        scores[f"mia_min_k_{k}"] = v
    for k, v in min_k_mean(tokens.zscore, tokens.mask, min_k_percents).items():
        scores[f"mia_min_k_pp_{k}"] = v
    if ref_nll is not None:
        if ref_nll.shape != (batch,):
            raise ValueError(f"ref_nll must have shape ({batch},), got {tuple(ref_nll.shape)}")
        scores["mia_ref"] = ref_nll.to(device=nll.device, dtype=torch.float64) - nll
    return scores


def membership_scores(logits: torch.Tensor, labels: torch.Tensor, *, texts: Sequence[str | bytes] | None = None,
                      ref_logits: torch.Tensor | None = None, ref_nll: torch.Tensor | None = None,
                      min_k_percents: Sequence[int] = MIN_K_PERCENTS,
                      block_elements: int | None = None) -> dict[str, torch.Tensor]:
    """Every membership score per chunk from one forward's ``logits [B,T,V]`` and ``labels [B,T]``: ``{name: [B]}``.

    Give the reference model either as ``ref_logits`` (same chunks, same labels) or as precomputed ``ref_nll``.
    """
    return scores_from_tokens(token_stats(logits, labels, block_elements=block_elements), texts=texts,
                              ref_nll=resolve_ref_nll(ref_logits, ref_nll, labels, block_elements=block_elements),
                              min_k_percents=min_k_percents)


def resolve_ref_nll(ref_logits: torch.Tensor | None, ref_nll: torch.Tensor | None, labels: torch.Tensor, *,
                    block_elements: int | None = None) -> torch.Tensor | None:
    """The reference mean NLL per chunk from whichever of ``ref_logits`` / ``ref_nll`` was given (not both).

    From logits it is ``terms.chunk_nll``, which works in row blocks of about ``block_elements`` logit entries, so its
    fp32 log-softmax never spans the whole batch.
    """
    if ref_logits is not None and ref_nll is not None:
        raise ValueError("give ref_logits or ref_nll, not both")
    if ref_logits is None:
        return ref_nll
    return chunk_nll(ref_logits, labels, block_elements).double()


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target_fpr: float) -> float:
    """Highest TPR of any ROC point whose FPR is <= ``target_fpr`` (no interpolation between points).

    This is the TPR of the best threshold whose *empirical* FPR does not exceed the target (Carlini et al., "Membership
    Inference Attacks From First Principles", S&P 2022). With fewer than ``1/target_fpr`` non-members it means
    "no false positive at all". ``roc_curve`` always starts at (0, 0), so the value is defined.
    """
    return float(tpr[fpr <= target_fpr].max())


def attack_report(member_scores, nonmember_scores) -> dict:
    """How well a score separates members (label 1) from non-members (label 0); higher score = predicted member.

    Returns ``auc`` (ROC AUC as is: an AUC below 0.5 means the score ranks non-members higher and is NOT folded to
    ``1 - auc``), ``balanced_accuracy`` (best ``(TPR + TNR) / 2`` over thresholds), ``tpr_at_1pct_fpr`` and
    ``tpr_at_5pct_fpr`` (see ``tpr_at_fpr``), the ROC points ``fpr``/``tpr`` (lists, every threshold kept), and
    ``num_members``/``num_nonmembers``.
    """
    members = _as_scores(member_scores, "member_scores")
    nonmembers = _as_scores(nonmember_scores, "nonmember_scores")
    y_true = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    y_score = np.concatenate([members, nonmembers])
    fpr, tpr, _ = roc_curve(y_true, y_score, drop_intermediate=False)
    report = {
        "auc": float(roc_auc_score(y_true, y_score)),
        "balanced_accuracy": float(((tpr + 1.0 - fpr) / 2.0).max()),
    }
    for target in FPR_TARGETS:
        report[f"tpr_at_{round(target * 100)}pct_fpr"] = tpr_at_fpr(fpr, tpr, target)
    report.update(fpr=fpr.tolist(), tpr=tpr.tolist(), num_members=len(members), num_nonmembers=len(nonmembers))
    return report


def _as_scores(scores, name: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has {int((~np.isfinite(arr)).sum())} non-finite scores "
                         "(a chunk with no counted token scores NaN)")
    return arr
