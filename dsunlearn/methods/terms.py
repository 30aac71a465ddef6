"""Pure loss math shared by every method and by evaluation.

Conventions (one place, so every method and metric agrees):
- ``logits`` is ``[B, T, V]`` from a causal LM over ``input_ids`` ``[B, T]``.
- ``labels`` is ``[B, T]`` aligned with ``input_ids`` (HF convention): the logits at position t predict ``labels[t+1]``.
  ``IGNORE_INDEX`` (-100) marks padding and anything else that must not count.
- "NLL" of a chunk is the mean next-token negative log-likelihood over its counted positions; a batch loss is the mean
  over chunks. Averaging per chunk first makes the loss of a global batch independent of how the chunks are spread over
  ranks (every rank holds the same number of chunks and DeepSpeed averages gradients), which is what lets a 2-rank run
  reproduce a 1-rank run step for step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits with the token each position predicts.

    Returns ``(logits[:, :-1], targets[:, 1:], mask)`` where ``mask`` is a float ``[B, T-1]`` tensor with 1 where the
    target counts. Ignored targets are replaced by 0 so they can be gathered safely; the mask removes them.
    """
    shifted_logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = (targets != IGNORE_INDEX)
    return shifted_logits, targets.masked_fill(~mask, 0), mask.to(shifted_logits.dtype)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token: ``([B, T-1] log p(y_t+1 | y_<=t), [B, T-1] mask)``; masked entries are 0.

    Computed in fp32 whatever the model dtype: bf16 log-softmax over a 32k+ vocabulary loses the digits that small
    loss differences between methods live in.
    """
    shifted_logits, targets, mask = shift_for_next_token(upcast(logits), labels)
    logp = torch.log_softmax(shifted_logits, dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = mask.to(picked.dtype)
    return picked * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probabilities per chunk, ``[B]`` (log pi(y) in NPO's notation)."""
    picked, _ = token_logprobs(logits, labels)
    return picked.sum(-1)


def chunk_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per chunk over counted positions, ``[B]``. A chunk with no counted position gives 0."""
    picked, mask = token_logprobs(logits, labels)
    return -picked.sum(-1) / mask.sum(-1).clamp(min=1.0)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch NLL: the mean over chunks of each chunk's mean next-token NLL (a scalar)."""
    return chunk_nll(logits, labels).mean()


def cross_entropy_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-weighted NLL over the whole batch, as ``F.cross_entropy`` computes it (used only to cross-check)."""
    shifted_logits, targets, mask = shift_for_next_token(logits, labels)
    targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
    return F.cross_entropy(upcast(shifted_logits).reshape(-1, shifted_logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
