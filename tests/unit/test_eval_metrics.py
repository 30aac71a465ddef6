"""Split metrics and per-chunk MIA scores against a plain per-chunk, per-token reference on a tiny Llama."""
from __future__ import annotations

import math
import zlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsunlearn.eval.metrics import chunk_stats, concat_stats, split_metrics
from dsunlearn.eval.mia import MIN_K_PERCENTS, membership_scores
from dsunlearn.methods.terms import IGNORE_INDEX, chunk_nll

VOCAB = 97
LENGTHS = [12, 7, 12, 3, 9]  # real tokens per chunk; T = 12, right padding
TOL = dict(rtol=0, atol=1e-5)


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      # The default 0.02 gives near-uniform next-token distributions (sigma_t ~ 0.1), where Min-K%++
                      # divides fp32 rounding by a tiny sigma; 0.2 gives sigma_t ~ 1, as a trained LM has.
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup():
    model, ref_model = tiny_llama(0), tiny_llama(1)
    gen = torch.Generator().manual_seed(123)
    T = max(LENGTHS)
    chunks = [torch.randint(1, VOCAB, (n,), generator=gen) for n in LENGTHS]
    input_ids = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, c in enumerate(chunks):
        input_ids[i, :len(c)] = c
        attention[i, :len(c)] = 1
        labels[i, :len(c)] = c
    # Mask the first target of chunk 0 too: a hole in the middle of the labels, not only padding.
    labels[0, 1] = IGNORE_INDEX
    texts = [" ".join(map(str, c.tolist())) for c in chunks]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        ref_logits = ref_model(input_ids=input_ids, attention_mask=attention).logits
    refs = [reference_chunk(model, ref_model, c, labels[i], texts[i]) for i, c in enumerate(chunks)]
    return dict(chunks=chunks, labels=labels, logits=logits, ref_logits=ref_logits, texts=texts, refs=refs)


def reference_chunk(model, ref_model, ids, labels_row, text, percents=MIN_K_PERCENTS):
    """One chunk alone (no padding), one token at a time, plain Python over the counted positions."""
    n = len(ids)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()
        ref_logits = ref_model(input_ids=ids[None]).logits[0].double()
    logps, zs, ref_logps, correct = [], [], [], 0
    for t in range(n - 1):
        target = int(labels_row[t + 1])
        if target == IGNORE_INDEX:
            continue
        lp = torch.log_softmax(logits[t], -1)
        p = lp.exp()
        mu = sum(float(p[v]) * float(lp[v]) for v in range(VOCAB))
        var = sum(float(p[v]) * (float(lp[v]) - mu) ** 2 for v in range(VOCAB))
        logps.append(float(lp[target]))
        zs.append((float(lp[target]) - mu) / math.sqrt(var))
        ref_logps.append(float(torch.log_softmax(ref_logits[t], -1)[target]))
        correct += int(int(logits[t].argmax()) == target)
    m = len(logps)
    nll = -sum(logps) / m
    out = {"nll_sum": -sum(logps), "num_tokens": m, "num_correct": correct, "mia_loss": -nll,
           "mia_zlib": -nll / len(zlib.compress(text.encode())), "mia_ref": -sum(ref_logps) / m - nll}
    for k in percents:
        n_k = max(1, int(m * k / 100))
        out[f"mia_min_k_{k}"] = sum(sorted(logps)[:n_k]) / n_k
        out[f"mia_min_k_pp_{k}"] = sum(sorted(zs)[:n_k]) / n_k
    return out


def test_chunk_stats_match_per_chunk_reference(setup):
    s = setup
    stats = chunk_stats(s["logits"], s["labels"], texts=s["texts"], ref_logits=s["ref_logits"])
    for i, ref in enumerate(s["refs"]):
        assert set(ref) == set(stats)
        for key, expected in ref.items():
            got = float(stats[key][i])
            assert got == pytest.approx(expected, abs=TOL["atol"]), (i, key, got, expected)
    assert stats["num_tokens"].tolist() == [10, 6, 11, 2, 8]  # n-1 targets, one more masked in chunk 0
    assert all(v.shape == (len(LENGTHS),) for v in stats.values())


def test_ref_nll_same_as_ref_logits(setup):
    s = setup
    from_logits = membership_scores(s["logits"], s["labels"], ref_logits=s["ref_logits"])
    from_cache = membership_scores(s["logits"], s["labels"], ref_nll=chunk_nll(s["ref_logits"], s["labels"]))
    torch.testing.assert_close(from_logits["mia_ref"], from_cache["mia_ref"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        membership_scores(s["logits"], s["labels"], ref_logits=s["ref_logits"], ref_nll=from_cache["mia_loss"])


def test_loss_score_agrees_with_terms(setup):
    s = setup
    scores = membership_scores(s["logits"], s["labels"])
    torch.testing.assert_close(scores["mia_loss"], -chunk_nll(s["logits"], s["labels"]).double(), **TOL)


def test_padding_content_does_not_matter(setup):
    s = setup
    logits = s["logits"].clone()
    # Garbage wherever the prediction targets an ignored label, and at the last position (predicts nothing).
    unused = torch.ones_like(s["labels"], dtype=torch.bool)
    unused[:, :-1] = s["labels"][:, 1:] == IGNORE_INDEX
    logits[unused] = torch.randn_like(logits[unused]) * 50
    a = chunk_stats(s["logits"], s["labels"])
    b = chunk_stats(logits, s["labels"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_split_metrics_token_weighted_and_rank_invariant(setup):
    s = setup
    whole = chunk_stats(s["logits"], s["labels"])
    # Two "ranks" holding uneven shares, gathered in another order: same numbers as one process.
    parts = [chunk_stats(s["logits"][2:], s["labels"][2:]), chunk_stats(s["logits"][:2], s["labels"][:2])]
    gathered = concat_stats(parts)
    m1, m2 = split_metrics(whole), split_metrics(gathered)
    assert m1 == pytest.approx(m2, rel=1e-12)
    # Token-weighted loss is F.cross_entropy over all counted tokens (terms.cross_entropy_mean).
    from dsunlearn.methods.terms import cross_entropy_mean
    assert m1["loss"] == pytest.approx(float(cross_entropy_mean(s["logits"], s["labels"])), abs=1e-6)
    assert m1["perplexity"] == pytest.approx(math.exp(m1["loss"]))
    refs = s["refs"]
    assert m1["accuracy"] == pytest.approx(sum(r["num_correct"] for r in refs) / sum(r["num_tokens"] for r in refs))
    assert (m1["num_tokens"], m1["num_chunks"]) == (37, 5)


def test_single_position_chunks():
    stats = chunk_stats(torch.randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long))
    assert stats["num_tokens"].tolist() == [0, 0] and torch.isnan(stats["mia_min_k_20"]).all()


def test_empty_chunk_scores_nan_and_split_errors():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4], [1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    stats = chunk_stats(logits, labels)
    assert stats["num_tokens"].tolist() == [3, 0]
    assert math.isnan(float(stats["mia_min_k_pp_20"][1])) and math.isnan(float(stats["mia_loss"][1]))
    assert math.isfinite(float(stats["mia_min_k_pp_20"][0]))
    with pytest.raises(ValueError, match="no counted token"):
        split_metrics(chunk_stats(logits[1:], labels[1:]))


def test_min_k_count_floor_at_least_one():
    # 3 counted tokens with log-probs known exactly: k=10 -> 1 token, k=60 -> floor(1.8) = 1, k=100 -> 3.
    logits = torch.full((1, 4, 3), -1e4)
    labels = torch.tensor([[0, 0, 1, 2]])
    logits[0, 0, 0], logits[0, 1, 1], logits[0, 2, 2] = 0.0, 0.0, 0.0  # each target certain: log p = 0
    logits[0, 1] = torch.tensor([0.0, 0.0, -1e4])  # target 1 at p = 1/2
    s = membership_scores(logits, labels, min_k_percents=(10, 60, 67, 100))
    assert float(s["mia_min_k_10"][0]) == pytest.approx(-math.log(2))
    assert float(s["mia_min_k_60"][0]) == pytest.approx(-math.log(2))
    assert float(s["mia_min_k_67"][0]) == pytest.approx(-math.log(2) / 2)  # floor(2.01) = 2
    assert float(s["mia_min_k_100"][0]) == pytest.approx(-math.log(2) / 3)
    with pytest.raises(ValueError, match="percent"):
        membership_scores(logits, labels, min_k_percents=(0,))


def test_texts_length_checked(setup):
    with pytest.raises(ValueError, match="texts"):
        chunk_stats(setup["logits"], setup["labels"], texts=["a"])


@pytest.mark.parametrize("rows", [1, 3, 25, 1000])  # < one chunk, two chunks per block, all in one block
def test_blocking_does_not_change_results(setup, rows):
    s = setup
    a = chunk_stats(s["logits"], s["labels"], texts=s["texts"])
    b = chunk_stats(s["logits"], s["labels"], texts=s["texts"], block_elements=rows * VOCAB)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def _logits_predicting(labels: torch.Tensor, correct: list[list[bool]], vocab: int = 5) -> torch.Tensor:
    """Logits whose argmax at position t is labels[t+1] where ``correct[b][t]``, another token elsewhere."""
    batch, seq = labels.shape
    logits = torch.zeros(batch, seq, vocab)
    for b in range(batch):
        for t, ok in enumerate(correct[b]):
            target = int(labels[b, t + 1]) if labels[b, t + 1] != IGNORE_INDEX else 0
            logits[b, t, target if ok else (target + 1) % vocab] = 5.0
    return logits


def test_exact_memorisation_and_extraction_strength_by_hand():
    # Prompt = the first 2 tokens; the continuation = tokens 2.. (predicted at shifted positions 1..).
    labels = torch.tensor([[1, 2, 3, 4, 1, 2],              # y = tokens 2..5 (4 tokens)
                           [2, 3, 4, 1, IGNORE_INDEX, IGNORE_INDEX],  # y = tokens 2..3 (2 tokens)
                           [3, 4, 1, 2, 3, 4],              # y = 4 tokens, the last one missed
                           [4, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])  # no continuation
    correct = [[False, True, False, True, True],   # y: hit miss hit hit -> exact 3/4, matching suffix 2 -> 0.5
               [False, True, True, False, False],  # y: hit hit -> 1, 1 (positions past the chunk do not count)
               [True, True, True, True, False],    # y: hit hit hit miss -> 3/4, 0 (no matching suffix)
               [True, False, False, False, False]]  # |y| = 0: left out of the means
    stats = chunk_stats(_logits_predicting(labels, correct), labels, memorisation_prefix=2)
    assert stats["mem_tokens"].tolist() == [4, 2, 4, 0]
    assert stats["mem_correct"].tolist() == [3, 2, 3, 0]
    assert stats["mem_suffix"].tolist() == [2, 2, 0, 0]
    metrics = split_metrics(stats)
    assert metrics["exact_memorisation"] == pytest.approx((3 / 4 + 1 + 3 / 4) / 3)
    assert metrics["extraction_strength"] == pytest.approx((2 / 4 + 1 + 0) / 3)
    # Prompt of 1 token: chunk 3 has one continuation token (predicted at position 0: a hit).
    one = chunk_stats(_logits_predicting(labels, correct), labels, memorisation_prefix=1)
    assert one["mem_tokens"].tolist() == [5, 3, 5, 1] and one["mem_suffix"].tolist() == [2, 2, 0, 1]
    # Off by default: no memorisation fields at all; a split where no chunk has a continuation gives None.
    assert "mem_tokens" not in chunk_stats(_logits_predicting(labels, correct), labels)
    assert "exact_memorisation" not in split_metrics(chunk_stats(_logits_predicting(labels, correct), labels))
    short = chunk_stats(_logits_predicting(labels[3:], correct[3:]), labels[3:], memorisation_prefix=2)
    assert split_metrics(short)["exact_memorisation"] is None


def test_memorisation_stats_are_rank_invariant(setup):
    s = setup
    whole = split_metrics(chunk_stats(s["logits"], s["labels"], memorisation_prefix=3))
    parts = concat_stats([chunk_stats(s["logits"][3:], s["labels"][3:], memorisation_prefix=3),
                          chunk_stats(s["logits"][:3], s["labels"][:3], memorisation_prefix=3)])
    assert split_metrics(parts) == pytest.approx(whole, rel=1e-12)
