"""The distribution-shift check on the forget/approximate split (dsunlearn.eval.shift).

Synthetic corpora come from a word-level Markov generator over made-up words with Zipf-distributed transitions, so
"same source" means documents drawn independently from one generator (they differ in membership only) and "different
source" means a second generator (other vocabulary) or Python-like code built from the same words.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from dsunlearn.eval.shift import ShiftReport, blind_baseline_auc, check_split, shift_statistics

_SYLLABLES = ["ka", "to", "mi", "ra", "ne", "su", "lo", "pe", "di", "vu", "ha", "ji", "co", "wa", "fe", "ze", "bo",
              "ly", "qu", "xi"]


def make_generator(seed: int, vocab_size: int = 300, zipf: float = 1.1):
    """A vocabulary of made-up words and a row-stochastic transition matrix (half a per-word Zipf permutation, half
    the global Zipf unigram), returned as cumulative rows for fast sampling."""
    rng = np.random.default_rng(seed)
    vocab: list[str] = []
    while len(vocab) < vocab_size:
        w = "".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4)))
        if w not in vocab:
            vocab.append(w)
    base = 1.0 / np.arange(1, vocab_size + 1) ** zipf
    trans = np.stack([base[rng.permutation(vocab_size)] for _ in range(vocab_size)])
    trans = 0.5 * trans / trans.sum(1, keepdims=True) + 0.5 * base / base.sum()
    return vocab, np.cumsum(trans, axis=1)


def _walk(gen, rng, num_words: int) -> list[str]:
    vocab, cum = gen
    w = int(rng.integers(len(vocab)))
    words = []
    for _ in range(num_words):
        words.append(vocab[w])
        w = min(int(np.searchsorted(cum[w], rng.random() * cum[w, -1])), len(vocab) - 1)
    return words


def prose_docs(gen, n: int, seed: int, min_words: int = 40, max_words: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        out, cap = [], True
        for x in _walk(gen, rng, int(rng.integers(min_words, max_words + 1))):
            out.append(x.capitalize() if cap else x)
            cap = rng.random() < 0.1
            if cap:
                out[-1] += "."
        docs.append(" ".join(out) + ".")
    return docs


def code_docs(gen, n: int, seed: int) -> list[str]:
    """Python-like functions whose identifiers are drawn from the same generator as the prose."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(int(rng.integers(2, 5))):
            name, a, b, c = _walk(gen, rng, 4)
            lines += [f"def {name}({a}, {b}=None):", f"    {c} = {a} + len({b} or [])", f"    return {c}", ""]
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def same_source():
    """60 + 60 documents from one generator: the pair differs in membership only."""
    docs = prose_docs(make_generator(1), 120, seed=101)
    return docs[:60], docs[60:]


@pytest.fixture(scope="module")
def different_source():
    return prose_docs(make_generator(1), 60, seed=5), prose_docs(make_generator(2), 60, seed=6)


# --- blind baseline -----------------------------------------------------------------------------------------------

def test_same_source_auc_near_chance(same_source):
    # Under no shift the out-of-fold AUC of 60 vs 60 is noisy: over 100 draws of this generator (data and fold seeds
    # varied) mean 0.483, sd 0.068, range 0.31-0.62 (the analytic random-scorer sd is 0.053). [0.3, 0.7] is 2.7 sd
    # below and 3.2 above that mean; this fixed draw gives 0.518, so the test is deterministic and only a library
    # change that reshuffles the result could move it (and then stays inside the band ~99% of the time).
    res = blind_baseline_auc(*same_source, seed=0)
    assert 0.3 <= res["auc"] <= 0.7, res
    assert res["folds"] == 5 and res["num_forget"] == 60 and res["num_approx"] == 60
    assert res["null_sd"] == pytest.approx(0.0527, abs=1e-3)
    assert len(res["fold_aucs"]) == 5 and res["reason"] is None


def test_different_vocabulary_auc_high(different_source):
    assert blind_baseline_auc(*different_source, seed=0)["auc"] >= 0.95


def test_prose_vs_code_auc_high():
    gen = make_generator(1)
    assert blind_baseline_auc(prose_docs(gen, 40, seed=7), code_docs(gen, 40, seed=8), seed=0)["auc"] >= 0.95


def test_deterministic_with_seed(same_source):
    a = blind_baseline_auc(*same_source, seed=3)
    b = blind_baseline_auc(*same_source, seed=3)
    assert a == b
    assert blind_baseline_auc(*same_source, seed=4)["fold_aucs"] != a["fold_aucs"]  # the seed picks the folds


def test_small_sets():
    gen = make_generator(1)
    few = prose_docs(gen, 3, seed=1)
    res = blind_baseline_auc(few, prose_docs(gen, 10, seed=2))
    assert res["auc"] is None and "at least 4" in res["reason"] and res["folds"] == 0
    res = blind_baseline_auc(prose_docs(gen, 4, seed=3), prose_docs(gen, 10, seed=4), folds=5)
    assert res["folds"] == 4 and isinstance(res["auc"], float)
    assert blind_baseline_auc([""] * 5, [" "] * 5)["auc"] is None


def test_bad_inputs():
    with pytest.raises(ValueError, match="single string"):
        blind_baseline_auc("one doc", ["a"] * 5)
    with pytest.raises(ValueError, match="only str"):
        blind_baseline_auc(["a"] * 5, ["b"] * 4 + [None])
    with pytest.raises(ValueError, match="folds"):
        blind_baseline_auc(["a"] * 5, ["b"] * 5, folds=1)


# --- statistics ---------------------------------------------------------------------------------------------------

def test_statistics_lengths_ttr_and_tokens():
    gen = make_generator(1)
    small, large = prose_docs(gen, 10, seed=1), prose_docs(gen, 100, seed=2)
    st = shift_statistics(small, large, tokenize=str.split)
    assert st["num_forget"] == 10 and st["num_approx"] == 100
    assert st["chars"]["forget"]["mean"] == pytest.approx(np.mean([len(t) for t in small]))
    assert st["tokens"]["approx"]["median"] == pytest.approx(np.median([len(t.split()) for t in large]))
    ttr = st["type_token_ratio"]
    # Same sample size from both sets, so the ratio is comparable although one set is 10x larger (the raw TTR of
    # the pooled sets would differ several-fold); both come from one generator, so the ratios agree closely.
    assert ttr["sample_words"] == 1000
    assert abs(ttr["forget"] - ttr["approx"]) < 0.05
    assert shift_statistics(small, large, seed=0) == shift_statistics(small, large, seed=0)
    assert "tokens" not in shift_statistics(small, large)


def test_distinguishing_ngrams_point_at_the_shift():
    forget = [f"the cat sat on the mat number {i} alpha alpha" for i in range(20)]
    approx = [f"the cat sat on the mat number {i} omega" for i in range(20)]
    ng = shift_statistics(forget, approx)["distinguishing_ngrams"]
    assert ng["forget"][0]["ngram"] in {"alpha", "alpha alpha"}
    assert ng["approx"][0]["ngram"] == "omega"
    assert ng["forget"][0]["z"] > 2 and ng["approx"][0]["z"] < -2
    # Shared n-grams sit near 0 (slightly negative: the same count is a lower rate in the longer forget set).
    assert all(abs(r["z"]) < 1 for r in ng["forget"] + ng["approx"] if r["ngram"] in {"cat", "the cat", "the"})
    assert "Monroe" in ng["method"]


def test_shared_documents_counted():
    st = shift_statistics(["a b c", "d e f"], ["a b c ", "x y z"])
    assert st["num_shared_documents"] == 1


# --- check_split --------------------------------------------------------------------------------------------------

def test_check_split_passes_membership_only_pair(same_source):
    report = check_split(*same_source, forget_loss=2.0, approx_loss=2.5, auc_band=0.2)
    assert isinstance(report, ShiftReport)
    assert report.passed, report.reasons
    assert report.reasons == [] and report.remedies == []
    assert report.loss_gap == pytest.approx(0.5)
    json.dumps(report.to_dict())
    assert "PASS" in report.to_markdown()


def test_check_split_fails_on_shift(different_source):
    report = check_split(*different_source)
    assert not report.passed
    assert len(report.reasons) == 1 and "text alone" in report.reasons[0]
    assert any("random document-level split" in r for r in report.remedies)
    assert any("retrained reference" in r for r in report.remedies)
    assert report.loss_gap is None
    md = report.to_markdown()
    assert "FAIL" in md and "Remedies" in md


def test_loss_gap_rule(same_source):
    forget, approx = same_source
    kw = dict(auc_band=0.2)
    lower = check_split(forget, approx, forget_loss=2.0, approx_loss=1.9, **kw)
    assert not lower.passed and lower.loss_gap == pytest.approx(-0.1)
    assert len(lower.reasons) == 1 and "not higher" in lower.reasons[0]
    assert any("really was in the original model's training data" in r for r in lower.remedies)
    assert not check_split(forget, approx, forget_loss=2.0, approx_loss=2.0, **kw).passed  # equal is not higher
    assert not check_split(forget, approx, forget_loss=2.0, approx_loss=2.5, min_loss_gap=0.6, **kw).passed
    per_doc = check_split(forget, approx, forget_loss=[1.0, 3.0], approx_loss=[2.0, 4.0, 3.0], **kw)
    assert per_doc.passed and per_doc.loss_gap == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both"):
        check_split(forget, approx, forget_loss=2.0)


def test_check_split_small_and_duplicated_sets():
    gen = make_generator(1)
    tiny = check_split(prose_docs(gen, 3, seed=1), prose_docs(gen, 3, seed=2))
    assert not tiny.passed and "could not run" in tiny.reasons[0] and tiny.blind_auc["auc"] is None
    forget = prose_docs(gen, 20, seed=3)
    dup = check_split(forget, forget[:5] + prose_docs(gen, 15, seed=4), auc_band=0.5)
    assert not dup.passed and any("verbatim" in r for r in dup.reasons)
    assert check_split(forget, forget[:5] + prose_docs(gen, 15, seed=4), auc_band=0.5,
                       max_shared_fraction=0.25).passed
    assert not any("within noise" in n for n in dup.notes)  # a 0.5 band is wide enough for 20 docs a side
    assert any("within noise" in n for n in check_split(forget, prose_docs(gen, 20, seed=5)).notes)  # 0.1 is not
    with pytest.raises(ValueError, match="need documents"):
        check_split([], forget)


def test_strata_keep_folds_balanced_per_domain():
    """A per-domain balanced design (same count of forget and approximate documents in each domain) must not push
    the blind AUC below chance: folds are stratified on (domain, label) when strata are given."""
    from dsunlearn.eval.shift import blind_baseline_auc
    from dsunlearn.toy import generate_documents
    domains = {"a": generate_documents(24, seed=1, prefix="a"), "b": generate_documents(24, seed=2, prefix="b"),
               "c": generate_documents(24, seed=3, prefix="c")}
    forget = [d for docs in domains.values() for d in docs[:12]]
    approx = [d for docs in domains.values() for d in docs[12:]]
    strata = [k for k in domains for _ in range(12)] * 2
    stratified = blind_baseline_auc(forget, approx, seed=0, strata=strata)["auc"]
    assert 0.3 <= stratified <= 0.7, stratified
    import pytest
    with pytest.raises(ValueError, match="strata has 3 entries"):
        blind_baseline_auc(forget, approx, strata=["a", "b", "c"])
