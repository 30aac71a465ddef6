"""The vocabulary-wide loss math runs in row blocks: same values and gradients as the whole-tensor formulas, for
every block size and dtype, and no full-vocabulary fp32 tensor is kept between forward and backward."""
import pytest
import torch

from dsunlearn.methods.terms import (IGNORE_INDEX, chunk_nll, kl_to_reference, next_token_logprobs_at,
                                     reference_distribution, row_blocks, token_logprobs)

B, T, V = 3, 7, 11


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 5:] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX  # a chunk with no counted target at all
    ref = 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    return logits, labels, ref


def _plain_logprobs(logits, labels):
    """The whole-tensor formula the blocked code replaces (autograd through one fp32 log-softmax)."""
    lp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1)
    mask = labels[:, 1:] != IGNORE_INDEX
    return lp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask


def _plain_kl(logits, labels, ref):
    lp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1)
    lp0 = torch.log_softmax(ref, -1)[:, :-1].to(lp.dtype)
    per_pos = (lp0.exp() * (lp0 - lp)).sum(-1)
    mask = (labels[:, 1:] != IGNORE_INDEX).to(per_pos.dtype)
    return ((per_pos * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def test_row_blocks_cover_every_position_once():
    for batch, num_pos, vocab, budget in [(3, 6, 11, 1), (3, 6, 11, 30), (3, 6, 11, 66), (3, 6, 11, 10**6),
                                          (1, 0, 5, 10), (4, 5, 3, 21)]:
        seen = torch.zeros(batch, num_pos, dtype=torch.long)
        for bs, ts in row_blocks(batch, num_pos, vocab, budget, torch.device("cpu")):
            seen[bs, ts] += 1
        assert (seen == 1).all(), (batch, num_pos, vocab, budget)


def test_gradcheck_double():
    logits, labels, ref = _inputs()
    index = torch.randint(0, V, (B, T - 1, 3))
    for block in (V, 2 * V, 4 * V, 10**6):  # one row per block, partial blocks, whole batch
        assert torch.autograd.gradcheck(lambda x: next_token_logprobs_at(x, index, block), (logits,))
        lp0 = reference_distribution(ref)[0]
        assert torch.autograd.gradcheck(lambda x: kl_to_reference(x, labels, lp0, block_elements=block), (logits,))


@pytest.mark.parametrize("block", [11, 33, 10**6])
def test_values_and_gradients_equal_the_whole_tensor_formulas(block):
    logits, labels, ref = _inputs(torch.float32)
    picked, mask = token_logprobs(logits, labels, block)
    plain_picked, plain_mask = _plain_logprobs(logits, labels)
    assert torch.equal(mask.bool(), plain_mask)
    torch.testing.assert_close(picked, plain_picked, rtol=0, atol=1e-6)
    w = torch.randn(B, T - 1)
    g_blocked, = torch.autograd.grad((picked * w).sum(), logits)
    g_plain, = torch.autograd.grad((plain_picked * w).sum(), logits)
    torch.testing.assert_close(g_blocked, g_plain, rtol=0, atol=1e-6)

    lp0 = reference_distribution(ref.float(), block_elements=block)[0]
    kl = kl_to_reference(logits, labels, lp0, block_elements=block)
    plain = _plain_kl(logits, labels, ref.float())
    torch.testing.assert_close(kl, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(kl, logits)[0], torch.autograd.grad(plain, logits)[0],
                               rtol=0, atol=1e-7)


def test_topk_reference_is_independent_of_the_block_size():
    _, _, ref = _inputs(torch.float32)
    whole = reference_distribution(ref, 4, block_elements=10**6)
    for block in (11, 33):
        for a, b in zip(reference_distribution(ref, 4, block_elements=block), whole):
            assert torch.equal(a, b)


def test_bf16_logits_get_a_bf16_gradient_of_the_fp32_math():
    logits, labels, _ = _inputs(torch.float32)
    low = logits.detach().bfloat16().requires_grad_()
    nll = chunk_nll(low, labels, 22).sum()
    nll.backward()
    assert low.grad.dtype == torch.bfloat16
    exact = low.detach().float().requires_grad_()
    _plain_nll = -(_plain_logprobs(exact, labels)[0].sum(-1) / _plain_logprobs(exact, labels)[1].sum(-1).clamp(min=1))
    _plain_nll.sum().backward()
    torch.testing.assert_close(nll.float(), _plain_nll.sum().detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(low.grad.float(), exact.grad.bfloat16().float(), rtol=0, atol=0)


def test_no_full_vocabulary_tensor_is_saved_for_backward():
    """What autograd keeps between forward and backward: only the logits and theta_0's own log-probs may be
    [B, T-ish, V]-sized (the whole-tensor formulas kept one or more fp32 log-softmax copies per term)."""
    logits, labels, ref = _inputs(torch.float32)
    lp0 = reference_distribution(ref.float())[0]
    allowed = {logits.untyped_storage().data_ptr(), lp0.untyped_storage().data_ptr()}
    saved = []

    def pack(t):
        saved.append((t.numel(), t.untyped_storage().data_ptr()))
        return t

    for loss_fn in (lambda: chunk_nll(logits, labels).mean(),
                    lambda: kl_to_reference(logits, labels, lp0),
                    lambda: kl_to_reference(logits, labels, *reference_distribution(ref.float(), 3))):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn()
        big = [ptr for numel, ptr in saved if numel >= B * (T - 1) * V]
        assert big and set(big) <= allowed, saved
    # The whole-tensor formula, for contrast, saves a fresh full-size tensor.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _plain_logprobs(logits, labels)
    assert any(numel >= B * (T - 1) * V and ptr not in allowed for numel, ptr in saved)


def _stream_losses(parts, labels, lp0, case):
    forget, retain = parts
    if case == "ga_gd":
        return -chunk_nll(forget, labels[:1]).mean() + chunk_nll(retain, labels[1:]).mean()
    if case == "two_terms_one_stream":  # the second term on `retain` cannot reuse the claimed rows
        return (chunk_nll(retain, labels[1:]).mean() + kl_to_reference(retain, labels[1:], lp0[1:])
                - chunk_nll(forget, labels[:1]).mean())
    if case == "plain_op_and_unused_stream":  # a loss outside terms.py; forget gets no gradient at all
        return retain.float().square().mean()
    raise ValueError(case)


@pytest.mark.parametrize("case", ["ga_gd", "two_terms_one_stream", "plain_op_and_unused_stream"])
def test_shared_stream_gradient_equals_split(case):
    from dsunlearn.methods.terms import split_streams
    logits, labels, ref = _inputs(torch.float32)
    logits, labels = logits[:2].detach().requires_grad_(), labels[:2]
    lp0 = reference_distribution(ref[:2].float())[0]
    expected, = torch.autograd.grad(_stream_losses(logits.split([1, 1]), labels, lp0, case), logits)
    parts = split_streams(logits, [1, 1])
    part_grads = {}
    for i, part in enumerate(parts):
        part.register_hook(lambda g, i=i: part_grads.__setitem__(i, None if g is None else g.data_ptr()))
    got, = torch.autograd.grad(_stream_losses(parts, labels, lp0, case), logits)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    if case == "ga_gd":  # each stream's loss wrote its rows of the one gradient that reached the logits: no copy
        row_bytes = got.stride(0) * got.element_size()
        assert part_grads == {0: got.data_ptr(), 1: got.data_ptr() + row_bytes}
        assert torch.equal(got, expected)
