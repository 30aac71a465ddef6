"""GA and GA+GD loss terms against values computed by hand, with padding masked."""
import math

import pytest
import torch

from dsunlearn.methods import METHODS, build_method, term_weights
from dsunlearn.config import ConfigError, MethodConfig
from dsunlearn.methods.base import StreamOutputs
from dsunlearn.methods.terms import IGNORE_INDEX, chunk_nll, cross_entropy_mean, token_nll


def _logits_for(probs_rows):
    """Logits whose softmax is exactly the given rows (log of the probabilities)."""
    return torch.log(torch.tensor(probs_rows, dtype=torch.float64))


def _toy_stream():
    # Vocabulary of 3. Chunk 0: 3 real tokens [0, 1, 2]; chunk 1: 2 real tokens [2, 2] then padding.
    # Position t predicts token t+1, so chunk 0 has 2 counted targets, chunk 1 has 1 (the padded target is masked).
    p = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]
    logits = torch.stack([_logits_for(p), _logits_for(p)])
    labels = torch.tensor([[0, 1, 2], [2, 2, IGNORE_INDEX]])
    # Hand values: chunk 0 -> -(log p[0][1] + log p[1][2]) / 2 = -(log .2 + log .3)/2 ; chunk 1 -> -log p[0][2] = -log .1
    chunk0 = -(math.log(0.2) + math.log(0.3)) / 2
    chunk1 = -math.log(0.1)
    return StreamOutputs(logits=logits, labels=labels, input_ids=labels.clamp(min=0)), chunk0, chunk1


def test_chunk_and_batch_nll_by_hand():
    s, c0, c1 = _toy_stream()
    assert torch.allclose(chunk_nll(s.logits, s.labels), torch.tensor([c0, c1], dtype=torch.float64))
    assert token_nll(s.logits, s.labels).item() == pytest.approx((c0 + c1) / 2)
    # The token-weighted mean differs (3 counted tokens): the chunk mean is a deliberate choice, see terms.py.
    assert cross_entropy_mean(s.logits, s.labels).item() == pytest.approx((2 * c0 + c1) / 3)


def test_padding_does_not_change_the_loss():
    s, c0, c1 = _toy_stream()
    garbage = s.logits.clone()
    garbage[1, 1:] = torch.randn_like(garbage[1, 1:]) * 50  # logits at padded/unused positions
    assert torch.allclose(chunk_nll(garbage, s.labels), chunk_nll(s.logits, s.labels))


def test_ga_terms_by_hand():
    s, c0, c1 = _toy_stream()
    terms = METHODS["ga"]().terms({"forget": s})
    assert set(terms) == {"forget"}
    assert terms["forget"].item() == pytest.approx(-(c0 + c1) / 2)


def test_ga_gd_terms_by_hand():
    forget, c0, c1 = _toy_stream()
    retain_logits = torch.zeros(1, 2, 4, dtype=torch.float64)  # uniform over 4 tokens -> NLL log 4
    retain = StreamOutputs(logits=retain_logits, labels=torch.tensor([[1, 3]]), input_ids=torch.tensor([[1, 3]]))
    terms = METHODS["ga_gd"]().terms({"forget": forget, "retain": retain})
    assert terms["forget"].item() == pytest.approx(-(c0 + c1) / 2)
    assert terms["retain"].item() == pytest.approx(math.log(4))


def test_gradient_directions():
    """One SGD step on GA moves the forget NLL up; on the GA+GD retain term it moves the retain NLL down."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    s = StreamOutputs(logits=logits, labels=labels, input_ids=labels)
    before = token_nll(logits, labels).item()
    terms = METHODS["ga_gd"]().terms({"forget": s, "retain": s})
    terms["forget"].backward()
    after = token_nll(logits.detach() - 1.0 * logits.grad, labels).item()
    assert after > before
    logits.grad = None
    terms = METHODS["ga_gd"]().terms({"forget": s, "retain": s})
    terms["retain"].backward()
    assert token_nll(logits.detach() - 1.0 * logits.grad, labels).item() < before


def test_registry_errors():
    with pytest.raises(ConfigError, match="unknown method 'gaa'; valid: "):
        build_method(MethodConfig(name="gaa"))
    with pytest.raises(ConfigError, match="unknown term"):
        build_method(MethodConfig(name="ga", weights={"retain": 1.0}))
    with pytest.raises(ConfigError, match="method.params: unknown key"):
        build_method(MethodConfig(name="ga", params={"beta": 0.1}))
    m = build_method(MethodConfig(name="ga_gd", weights={"retain": 0.5}))
    assert term_weights(m, MethodConfig(name="ga_gd", weights={"retain": 0.5})) == {"forget": 1.0, "retain": 0.5}


def test_adversarial_targets_skip_special_tokens():
    """theta_0's best wrong guess, never a special token; a true special target keeps its label; padding stays masked.

    Vocabulary of 6: 0 = pad, 1 = EOS, 2 = BOS (special), 3..5 text.
    """
    from dsunlearn.methods.terms import adversarial_targets
    special = torch.tensor([0, 1, 2])
    logits = torch.tensor([[
        [9.0, 8.0, 1.0, 7.0, 2.0, 6.0],   # predicts 3 (true, excluded); EOS and pad rank above every text token -> 5
        [0.0, 9.0, 8.0, 1.0, 3.0, 2.0],   # predicts 5; EOS, BOS best -> 4
        [0.0, 9.0, 0.0, 5.0, 4.0, 0.0],   # predicts EOS (special): keeps EOS
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # predicts padding: masked
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # last position: predicts nothing
    ]])
    labels = torch.tensor([[2, 3, 5, 1, IGNORE_INDEX]])
    out = adversarial_targets(logits, labels, special)
    assert out.tolist() == [[2, 5, 4, 1, IGNORE_INDEX]]
    # Without exclusions the same logits give the special tokens (the behaviour before the fix).
    assert adversarial_targets(logits, labels, torch.tensor([], dtype=torch.long)).tolist() == [
        [2, 0, 1, 3, IGNORE_INDEX]]
