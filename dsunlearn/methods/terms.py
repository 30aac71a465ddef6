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


# ---------------------------------------------------------------------------------------------------------------------
# Terms against the frozen original model (theta_0) and the other methods' losses.

def chunk_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` per-position values -> ``[B]`` mean over each chunk's counted positions (0 for an empty chunk)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Maechler 2012). ``x`` is clamped just below 0: a
    mass that rounds to 1 in fp32 leaves ~1 ulp, not ``log 0``."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def reference_distribution(logits: torch.Tensor, topk: int | None = None):
    """theta_0's next-token distribution in the form the KL term takes: ``(logprobs, ids, rest_logmass)``.

    - ``topk`` None or >= vocab: the full log-probabilities ``[B, T, V]`` and ``ids = rest_logmass = None``.
    - otherwise the top-k log-probs and their ids ``[B, T, k]`` and ``rest_logmass`` ``[B, T]`` = log of the mass
      outside the top k (summed exactly from the other entries, not as ``1 - sum``, so it keeps its digits).
    """
    logp = torch.log_softmax(upcast(logits), dim=-1)
    # A token theta_0 gives probability 0 would make exp(-inf) * (-inf - x) = NaN in the KL; in place: no copy.
    logp.clamp_(min=torch.finfo(logp.dtype).min)
    if topk is None or topk >= logp.size(-1):
        return logp, None, None
    values, ids = logp.topk(topk, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return values, ids, rest


def kl_to_reference(logits: torch.Tensor, labels: torch.Tensor, ref_logprobs: torch.Tensor,
                    ref_ids: torch.Tensor | None = None, ref_rest_logmass: torch.Tensor | None = None) -> torch.Tensor:
    """Batch KL(p_theta0 || p_theta): per position, mean over each chunk's counted positions, mean over chunks.

    Positions count where the next token is not padding (the positions NLL counts). With ``ref_ids`` None the
    reference is the full distribution and the KL is exact. With top-k ids the KL is taken between the two
    distributions coarsened to {the k tokens, "everything else"}:

        sum_{v in K} p0(v) log(p0(v) / p(v))  +  P0_rest log(P0_rest / P_rest),   P_rest = 1 - sum_{v in K} p(v)

    a lower bound of the exact KL (data processing), equal to it when k = vocab and 0 when theta = theta_0.
    ``ref_logprobs`` must be finite (``reference_distribution`` clamps them): with full-vocabulary tensors every extra
    copy costs as much as the logits.
    """
    shifted, _, mask = shift_for_next_token(upcast(logits), labels)
    logp = torch.log_softmax(shifted, dim=-1)
    lp0 = ref_logprobs[:, :-1].to(logp.dtype)
    if ref_ids is None:
        per_position = (lp0.exp() * (lp0 - logp)).sum(-1)
    else:
        lpk = logp.gather(-1, ref_ids[:, :-1].long())
        head = (lp0.exp() * (lp0 - lpk)).sum(-1)
        rest0 = ref_rest_logmass[:, :-1].to(logp.dtype)
        has_rest = torch.isfinite(rest0)
        safe_rest0 = torch.where(has_rest, rest0, torch.zeros_like(rest0))  # no NaN in the unused branch's gradient
        rest = log1mexp(lpk.logsumexp(-1))
        tail = torch.where(has_rest, safe_rest0.exp() * (safe_rest0 - rest), torch.zeros_like(rest))
        per_position = head + tail
    return chunk_mean(per_position, mask.to(per_position.dtype)).mean()


def npo_loss(seq_logprob: torch.Tensor, ref_seq_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024, eq. 3): ``-(2/beta) * mean log sigmoid(-beta * (log pi(y) - log pi_0(y)))``.

    ``seq_logprob`` are sequence log-likelihoods (sums over the chunk's tokens, ``sequence_logprob``). At theta =
    theta_0 the loss is ``(2/beta) log 2`` and its gradient is exactly GA's on the summed log-likelihood.
    """
    ratio = upcast(seq_logprob) - upcast(ref_seq_logprob).to(upcast(seq_logprob).dtype)
    return -(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * ratio).mean()


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, eq. 4): ``-(2/beta) * mean log sigmoid(-(beta/|y|) log pi(y) - gamma)``.

    Reference-free: the length-normalised log-likelihood ``log pi(y) / |y|`` (|y| = counted tokens of the chunk)
    replaces NPO's log-ratio to theta_0; ``gamma`` is the reward margin.
    """
    picked, mask = token_logprobs(logits, labels)
    mean_logprob = picked.sum(-1) / mask.sum(-1).clamp(min=1.0)
    return -(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * mean_logprob - gamma).mean()


def activation_mse(hidden: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RMU's activation distance: per real token the mean over hidden units of the squared error to ``target``
    (``[B, T, H]`` or a broadcastable ``[H]``), mean over each chunk's real tokens, mean over chunks."""
    hidden = upcast(hidden)
    squared = (hidden - target.to(hidden.dtype)).pow(2).mean(-1)
    return chunk_mean(squared, (labels != IGNORE_INDEX).to(squared.dtype)).mean()


def adversarial_targets(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels (aligned like ``labels``) whose target at position t+1 is theta_0's most likely token at position t
    *other than* the true token t+1. Uncounted targets stay ``IGNORE_INDEX``; position 0 (never a target) keeps its
    label. (The study's released code excluded token t instead, aiming at the guess two positions ahead.)"""
    shifted, targets, mask = shift_for_next_token(logits, labels)
    best = shifted.scatter(-1, targets.unsqueeze(-1), float("-inf")).argmax(-1)
    out = labels.clone()
    out[:, 1:] = torch.where(mask.bool(), best, torch.full_like(best, IGNORE_INDEX))
    return out
