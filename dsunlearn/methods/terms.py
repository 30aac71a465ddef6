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

from ..constants import IGNORE_INDEX  # re-exported: methods and tests read it here


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype loss math runs in: fp32 for fp16/bf16, fp32/fp64 unchanged."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32/fp64 unchanged."""
    return x.to(compute_dtype(x.dtype))


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, mask)``, both ``[B, T-1]``: the token each position predicts (``labels[:, 1:]``, ignored ones
    replaced by 0 so they can be gathered safely) and a bool mask of the targets that count."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return targets.masked_fill(~mask, 0), mask


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits with the token each position predicts.

    Returns ``(logits[:, :-1], targets, mask)`` as ``next_token_targets`` gives them, the mask as a float tensor in the
    logits' dtype.
    """
    targets, mask = next_token_targets(labels)
    return logits[:, :-1, :], targets, mask.to(logits.dtype)


def default_block_elements(device: torch.device) -> int:
    """Logit entries per block of every vocabulary-wide computation here and in evaluation: fits in cache on CPU (the
    work is memory-bound); on an accelerator it bounds each fp32 temporary to 64 MiB (128 rows of a 128k vocabulary:
    still large enough to keep the device busy), so the one or two temporaries a block needs stay far below one fp32
    copy of the logits even for a single 512-token chunk. At 2**26 (256 MiB per temporary, the earlier value) two
    temporaries of a 2 x 512 x 128256 batch's block were as large as an fp32 copy of all its logits."""
    return 2**20 if device.type == "cpu" else 2**24


def row_blocks(batch: int, num_pos: int, vocab: int, block_elements: int | None,
               device: torch.device) -> list[tuple[slice, slice]]:
    """``(batch slice, position slice)`` blocks covering ``[batch, num_pos]`` with about ``block_elements`` logit
    entries each (None: ``default_block_elements(device)``): whole chunks per block when a chunk fits, else slices of
    one chunk. Per-row math never depends on the blocking, so results are the same for every block size."""
    rows = max(1, (block_elements or default_block_elements(device)) // max(vocab, 1))
    if num_pos == 0 or batch == 0:
        return []
    if num_pos <= rows:
        per = rows // num_pos
        return [(slice(b, min(b + per, batch)), slice(0, num_pos)) for b in range(0, batch, per)]
    return [(slice(b, b + 1), slice(t, min(t + rows, num_pos))) for b in range(batch) for t in range(0, num_pos, rows)]


def _predicting_blocks(logits: torch.Tensor, block_elements: int | None) -> list[tuple[slice, slice]]:
    """Blocks over the positions that predict a next token (all but the last) of ``[B, T, V]`` logits."""
    batch, seq, vocab = logits.shape
    return row_blocks(batch, seq - 1, vocab, block_elements, logits.device)


class SharedLogitsGradient:
    """One gradient tensor for the fused ``[B, T, V]`` logits that every stream's loss writes its rows into.

    Without it, each stream's loss allocates a gradient of its own rows and autograd's split-backward then concatenates
    them into a new full-size tensor: two logits-sized gradients alive at once instead of one. Rows are handed out once
    per backward (``claim``); a second term on the same stream gets a fresh tensor and autograd adds the two as usual.
    """

    def __init__(self, fused: torch.Tensor):
        self.shape, self.dtype, self.device = fused.shape, fused.dtype, fused.device
        self.buffer, self.claimed = None, set()

    def rows(self, start: int, length: int) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.buffer.narrow(0, start, length)

    def claim(self, start: int, length: int) -> torch.Tensor | None:
        if start in self.claimed:
            return None
        self.claimed.add(start)
        return self.rows(start, length)

    def take(self) -> torch.Tensor:
        buffer, self.buffer, self.claimed = self.buffer, None, set()
        return buffer


class _SplitStreams(torch.autograd.Function):
    """``fused.split(sizes)`` whose backward hands back the shared gradient the streams' losses wrote into."""

    @staticmethod
    def forward(ctx, fused, sizes, shared):
        ctx.sizes, ctx.shared = sizes, shared
        return tuple(fused.split(sizes))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        start = 0
        for size, grad in zip(ctx.sizes, grads):
            rows = ctx.shared.rows(start, size)
            if grad is None:
                rows.zero_()
            elif grad.data_ptr() != rows.data_ptr() or grad.stride() != rows.stride():
                rows.copy_(grad)  # a gradient written elsewhere (another op, or a second term on this stream)
            start += size
        return ctx.shared.take(), None, None


def split_streams(fused_logits: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """Per-stream row slices of the fused forward's logits, as ``split`` gives them, but backed by one shared
    gradient (``SharedLogitsGradient``): the losses in this module write their gradient straight into it."""
    if not fused_logits.requires_grad:
        return tuple(fused_logits.split(sizes))
    shared = SharedLogitsGradient(fused_logits)
    parts = _SplitStreams.apply(fused_logits, list(sizes), shared)
    start = 0
    for part, size in zip(parts, sizes):
        part._dsunlearn_shared_gradient = (shared, start)
        start += size
    return parts


def _save_for_blocked_backward(ctx, block_elements, logits: torch.Tensor, *others: torch.Tensor) -> None:
    """What a blocked backward needs: the logits (and ``others``), the block size, and where to write d loss / d logits
    (this stream's rows of the shared gradient, when the logits came from ``split_streams``)."""
    ctx.save_for_backward(logits, *others)
    ctx.block_elements = block_elements
    ctx.shared_gradient = getattr(logits, "_dsunlearn_shared_gradient", None)


def _new_gradient(ctx, logits: torch.Tensor) -> torch.Tensor:
    """The tensor the backward fills: this stream's rows of the shared gradient when they are free, else a new one.
    Every position is written by the caller except the last, which is zeroed here."""
    grad = None
    if ctx.shared_gradient is not None:
        shared, start = ctx.shared_gradient
        grad = shared.claim(start, logits.size(0))
    if grad is None:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    grad[:, -1].zero_()  # the last position predicts nothing
    return grad


class _NextTokenLogSoftmaxGather(torch.autograd.Function):
    """``log_softmax(logits[:, :-1])`` gathered at ``index`` (``[B, T-1, K]``), in fp32, one row block at a time.

    Forward: ``x[index] - logsumexp(x)`` per block; only the logits (which exist anyway) and the ``[B, T-1]``
    log-normalisers are kept. Backward: ``d/dx = scatter(g, index) - exp(x - logsumexp(x)) * sum(g)`` per block,
    written straight into one gradient of the logits' own shape and dtype (no slice-backward copy, no fp32 copy of
    bf16 logits). Neither direction ever holds a ``[B, T, V]`` fp32 tensor, and it makes fewer passes over the
    vocabulary than autograd through ``log_softmax`` (2 + 2 instead of 3 + 2).
    """

    @staticmethod
    def forward(ctx, logits, index, block_elements):
        dtype = compute_dtype(logits.dtype)
        out = torch.empty(index.shape, dtype=dtype, device=logits.device)
        lse = torch.empty(logits.size(0), logits.size(1) - 1, dtype=dtype, device=logits.device)
        for bs, ts in _predicting_blocks(logits, block_elements):
            block = upcast(logits[bs, ts])
            lse[bs, ts] = torch.logsumexp(block, dim=-1)
            out[bs, ts] = block.gather(-1, index[bs, ts]) - lse[bs, ts].unsqueeze(-1)
        _save_for_blocked_backward(ctx, block_elements, logits, index, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        logits, index, lse = ctx.saved_tensors
        grad_logits = _new_gradient(ctx, logits)
        dtype = compute_dtype(logits.dtype)
        for bs, ts in _predicting_blocks(logits, ctx.block_elements):
            g = grad[bs, ts]
            # ONE fp32 temporary per block: a copy we own (upcast would return the logits themselves for fp32),
            # then every step in place.
            softmax = logits[bs, ts].to(dtype, copy=True).sub_(lse[bs, ts].unsqueeze(-1)).exp_()
            grad_logits[bs, ts] = softmax.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, index[bs, ts], g)
        return grad_logits, None, None


class _NextTokenKL(torch.autograd.Function):
    """Per position ``KL(p0 || softmax(logits))`` = ``sum_v p0 (log p0 - log p)`` for full-vocabulary reference
    log-probs ``[B, T, V]``, ``[B, T-1]`` out, in fp32, one row block at a time.

    The backward is the analytic ``g * (softmax(x) * sum_v p0 - p0)`` per block (what autograd derives through
    log-softmax), so no full-vocabulary fp32 intermediate is kept between forward and backward.
    """

    @staticmethod
    def forward(ctx, logits, ref_logprobs, block_elements):
        dtype = compute_dtype(logits.dtype)
        out = torch.empty(logits.size(0), logits.size(1) - 1, dtype=dtype, device=logits.device)
        for bs, ts in _predicting_blocks(logits, block_elements):
            logp = torch.log_softmax(upcast(logits[bs, ts]), dim=-1)
            lp0 = ref_logprobs[bs, ts].to(dtype)
            out[bs, ts] = (lp0.exp() * (lp0 - logp)).sum(-1)
        _save_for_blocked_backward(ctx, block_elements, logits, ref_logprobs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        logits, ref_logprobs = ctx.saved_tensors
        grad_logits = _new_gradient(ctx, logits)
        dtype = compute_dtype(logits.dtype)
        for bs, ts in _predicting_blocks(logits, ctx.block_elements):
            # Two fp32 temporaries per block (softmax and p0), each a copy we own, every step in place.
            softmax = logits[bs, ts].to(dtype, copy=True)
            softmax.sub_(softmax.amax(-1, keepdim=True)).exp_()
            softmax.div_(softmax.sum(-1, keepdim=True))
            p0 = ref_logprobs[bs, ts].to(dtype, copy=True).exp_()
            g = grad[bs, ts].unsqueeze(-1)
            grad_logits[bs, ts] = softmax.mul_(p0.sum(-1, keepdim=True)).sub_(p0).mul_(g)
        return grad_logits, None, None


def next_token_logprobs_at(logits: torch.Tensor, index: torch.Tensor,
                           block_elements: int | None = None) -> torch.Tensor:
    """``log p(index | x<=t)`` for ``index`` ``[B, T-1, K]`` at each predicting position of ``[B, T, V]`` logits:
    ``[B, T-1, K]`` fp32, computed block by block (see ``_NextTokenLogSoftmaxGather``)."""
    return _NextTokenLogSoftmaxGather.apply(logits, index.long(), block_elements)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                   block_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token: ``([B, T-1] log p(y_t+1 | y_<=t), [B, T-1] mask)``; masked entries are 0.

    Computed in fp32 whatever the model dtype: bf16 log-softmax over a 32k+ vocabulary loses the digits that small
    loss differences between methods live in. Computed in row blocks, so the only full-vocabulary tensors are the
    logits and, in the backward, their gradient.
    """
    targets, mask = next_token_targets(labels)
    picked = next_token_logprobs_at(logits, targets.unsqueeze(-1), block_elements).squeeze(-1)
    mask = mask.to(picked.dtype)
    return picked * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probabilities per chunk, ``[B]`` (log pi(y) in NPO's notation)."""
    picked, _ = token_logprobs(logits, labels)
    return picked.sum(-1)


def chunk_nll(logits: torch.Tensor, labels: torch.Tensor, block_elements: int | None = None) -> torch.Tensor:
    """Mean next-token NLL per chunk over counted positions, ``[B]``. A chunk with no counted position gives 0."""
    picked, mask = token_logprobs(logits, labels, block_elements)
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


def reference_distribution(logits: torch.Tensor, topk: int | None = None, block_elements: int | None = None):
    """theta_0's next-token distribution in the form the KL term takes: ``(logprobs, ids, rest_logmass)``.

    - ``topk`` None or >= vocab: the full fp32 log-probabilities ``[B, T, V]`` and ``ids = rest_logmass = None``.
    - otherwise the top-k log-probs and their ids ``[B, T, k]`` and ``rest_logmass`` ``[B, T]`` = log of the mass
      outside the top k (summed exactly from the other entries, not as ``1 - sum``, so it keeps its digits).
    Computed one row block at a time (``row_blocks``): the only full-vocabulary tensor beyond the logits is the
    full result itself.
    """
    batch, seq, vocab = logits.shape
    full = topk is None or topk >= vocab
    dtype = compute_dtype(logits.dtype)
    if full:
        values = torch.empty(batch, seq, vocab, dtype=dtype, device=logits.device)
    else:
        values = torch.empty(batch, seq, topk, dtype=dtype, device=logits.device)
        ids = torch.empty(batch, seq, topk, dtype=torch.long, device=logits.device)
        rest = torch.empty(batch, seq, dtype=dtype, device=logits.device)
    for bs, ts in row_blocks(batch, seq, vocab, block_elements, logits.device):
        logp = torch.log_softmax(upcast(logits[bs, ts]), dim=-1)
        # A token theta_0 gives probability 0 would make exp(-inf) * (-inf - x) = NaN in the KL; in place: no copy.
        logp.clamp_(min=torch.finfo(logp.dtype).min)
        if full:
            values[bs, ts] = logp
            continue
        top_values, top_ids = logp.topk(topk, dim=-1)
        values[bs, ts], ids[bs, ts] = top_values, top_ids
        rest[bs, ts] = logp.scatter_(-1, top_ids, float("-inf")).logsumexp(-1)
    return (values, None, None) if full else (values, ids, rest)


def kl_to_reference(logits: torch.Tensor, labels: torch.Tensor, ref_logprobs: torch.Tensor,
                    ref_ids: torch.Tensor | None = None, ref_rest_logmass: torch.Tensor | None = None,
                    block_elements: int | None = None) -> torch.Tensor:
    """Batch KL(p_theta0 || p_theta): per position, mean over each chunk's counted positions, mean over chunks.

    Positions count where the next token is not padding (the positions NLL counts). With ``ref_ids`` None the
    reference is the full distribution ``[B, T, V]`` and the KL is exact. With top-k ids the KL is taken between the
    two distributions coarsened to {the k tokens, "everything else"}:

        sum_{v in K} p0(v) log(p0(v) / p(v))  +  P0_rest log(P0_rest / P_rest),   P_rest = 1 - sum_{v in K} p(v)

    a lower bound of the exact KL (data processing), equal to it when k = vocab and 0 when theta = theta_0.
    ``ref_logprobs`` must be finite (``reference_distribution`` clamps them). Both forms run in row blocks: no
    full-vocabulary fp32 tensor is created besides the reference's own.
    """
    _, mask = next_token_targets(labels)
    if ref_ids is None:
        per_position = _NextTokenKL.apply(logits, ref_logprobs, block_elements)
    else:
        lpk = next_token_logprobs_at(logits, ref_ids[:, :-1], block_elements)
        lp0 = ref_logprobs[:, :-1].to(lpk.dtype)
        head = (lp0.exp() * (lp0 - lpk)).sum(-1)
        rest0 = ref_rest_logmass[:, :-1].to(lpk.dtype)
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


def adversarial_targets(logits: torch.Tensor, labels: torch.Tensor, excluded_ids: torch.Tensor) -> torch.Tensor:
    """Labels (aligned like ``labels``) whose target at position t+1 is theta_0's most likely token at position t
    *other than* the true token t+1 and the ``excluded_ids`` (the tokenizer's special tokens: a wrong EOS/BOS/pad is
    no wrong guess about the text). A true target among ``excluded_ids`` keeps its label (a document still ends with
    EOS), as random labels do (``reference._random_label_rows``). Uncounted targets stay ``IGNORE_INDEX``; position 0
    (never a target) keeps its label. (The study's released code excluded token t instead, aiming at the guess two
    positions ahead.)"""
    shifted, targets, mask = shift_for_next_token(logits, labels)
    excluded_ids = excluded_ids.to(device=logits.device, dtype=torch.long)
    candidates = shifted.scatter(-1, targets.unsqueeze(-1), float("-inf"))
    candidates.index_fill_(-1, excluded_ids, float("-inf"))
    best = torch.where(torch.isin(targets, excluded_ids), targets, candidates.argmax(-1))
    out = labels.clone()
    out[:, 1:] = torch.where(mask.bool(), best, torch.full_like(best, IGNORE_INDEX))
    return out
