"""Is the approximate set a fair stand-in for retraining? A distribution-shift check on the forget/approximate split.

Unlearning is judged against an "approximate" set: unseen documents from the same domain as the forget set, standing in
for what a model retrained without the forget set would have seen. Membership-inference AUCs and loss gaps between the
two sets only measure membership if the sets differ in membership and nothing else. A time split or a second source
shifts topic, style, vocabulary and length, and the attacks then measure that shift:

- Duan et al. 2024, "Do Membership Inference Attacks Work on Large Language Models?" (arXiv:2402.07841): MIAs on
  pretraining data are near chance once members and non-members come from the same distribution; the apparent
  successes came from temporal shift.
- Das et al. 2024, "Blind Baselines Beat Membership Inference Attacks for Foundation Models" (arXiv:2406.16201): a
  classifier that never sees the model beats published MIAs on the usual member/non-member splits.

So this module runs that blind classifier on the split itself. If text features alone separate the forget set from the
approximate set (cross-validated ROC AUC far from 0.5), the split is invalid as an unlearning yardstick, whatever the
model does. Pure numpy + scikit-learn; no model, no torch.
"""
from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = ["ShiftReport", "blind_baseline_auc", "check_split", "shift_statistics"]

# Word tokens for statistics: runs of word characters, or single punctuation marks (so code's "(", ":" and "=" count).
_WORD_RE = re.compile(r"\w+|[^\w\s]")
# Below this many documents per class the out-of-fold AUC is too noisy to mean anything (and stratified k-fold
# needs at least 2 per class per split to train on both classes).
MIN_DOCS_PER_CLASS = 4


def _check_texts(name: str, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a sequence of documents, got a single string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{name} must contain only str; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


def null_auc_sd(num_pos: int, num_neg: int) -> float:
    """Standard deviation of the ROC AUC of a random scorer (Mann-Whitney U under H0, no ties).

    Var(AUC) = (n1 + n2 + 1) / (12 n1 n2). With 60 documents a side this is ~0.053, so a +-0.1 band is ~2 sd. A lower
    bound on the noise of the cross-validated AUC, which also varies with the fold models.
    """
    return math.sqrt((num_pos + num_neg + 1) / (12.0 * num_pos * num_neg))


def _length_features(texts):
    # TF-IDF rows are L2-normalised, which hides document length; a time or source split often changes length, so
    # the blind classifier gets it explicitly. Module-level (not a lambda) so the pipeline stays picklable.
    return np.array([[math.log1p(len(t)), math.log1p(len(t.split()))] for t in texts], dtype=np.float64)


def _blind_pipeline(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler
    from sklearn.feature_extraction.text import TfidfVectorizer

    features = FeatureUnion([
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True, lowercase=False)),
        ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")),
        ("length", Pipeline([("raw", FunctionTransformer(_length_features)), ("scale", StandardScaler())])),
    ])
    # class_weight="balanced": unequal set sizes must not turn into an intercept the AUC would then have to undo.
    # liblinear is deterministic given random_state and fast on small sparse problems.
    clf = LogisticRegression(C=1.0, solver="liblinear", class_weight="balanced", max_iter=1000, random_state=seed)
    # Inside the pipeline, vocabularies, IDF weights and length scaling are fit on the training folds only, so nothing
    # about a held-out document leaks into the features it is scored with.
    return Pipeline([("features", features), ("clf", clf)])


def blind_baseline_auc(forget_texts: Sequence[str], approx_texts: Sequence[str], seed: int = 0,
                       folds: int = 5, strata: Sequence | None = None) -> dict:
    """Cross-validated ROC AUC of a text-only classifier telling forget documents (label 1) from approximate ones (0).

    The classifier never sees the model (Das et al. 2024): TF-IDF of character 1-4-grams (``char_wb``) and word uni- and
    bigrams (both sublinear tf), plus log character and word counts, into a class-balanced L2 logistic regression
    (C=1). Every document is scored by a model trained on the other folds (stratified k-fold, shuffled with ``seed``),
    and the AUC is computed on the pooled out-of-fold decision values. 0.5 means the text alone does not tell the sets
    apart; near 1.0 means they differ in something other than membership.

    ``folds`` is reduced to the size of the smaller set when that is smaller. With fewer than 4 documents in either set
    ``auc`` is ``None`` and ``reason`` says why.

    Returns a dict: ``auc`` (float or None), ``reason`` (str or None), ``folds`` (used), ``seed``, ``num_forget``,
    ``num_approx``, ``fold_aucs`` (AUC within each held-out fold, None where a fold lacks a class), ``null_sd`` (sd of
    the AUC of a random scorer at these set sizes, to judge how far from 0.5 is noise), ``features`` (description).
    """
    forget_texts = _check_texts("forget_texts", forget_texts)
    approx_texts = _check_texts("approx_texts", approx_texts)
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    num_forget, num_approx = len(forget_texts), len(approx_texts)
    result = {
        "auc": None, "reason": None, "folds": 0, "seed": seed, "num_forget": num_forget, "num_approx": num_approx,
        "fold_aucs": [], "null_sd": None,
        "features": "tfidf char_wb 1-4 + word 1-2 (sublinear) + log length; logistic regression C=1, balanced",
    }
    smaller = min(num_forget, num_approx)
    if smaller < MIN_DOCS_PER_CLASS:
        result["reason"] = (f"too few documents to cross-validate: {num_forget} forget and {num_approx} approximate; "
                            f"need at least {MIN_DOCS_PER_CLASS} in each")
        return result
    texts = forget_texts + approx_texts
    if not any(t.strip() for t in texts):
        result["reason"] = "every document is empty or whitespace"
        return result

    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    used_folds = min(folds, smaller)
    y = np.array([1] * num_forget + [0] * num_approx)
    cv = StratifiedKFold(n_splits=used_folds, shuffle=True, random_state=seed)
    # With a stratified design (e.g. 16 forget + 16 approximate documents per domain) folds must keep each
    # (stratum, label) cell balanced: otherwise a fold that holds out more forget documents of one domain trains on
    # more approximate documents of it, the classifier learns that domain backwards and the AUC drops below 0.5.
    groups = y if strata is None else np.array([f"{s}|{label}" for s, label in zip(strata, y)])
    if strata is not None and len(strata) != len(y):
        raise ValueError(f"strata has {len(strata)} entries for {len(y)} documents")
    splits = list(cv.split(texts, groups))
    scores = cross_val_predict(_blind_pipeline(seed), texts, y, cv=splits, method="decision_function")
    fold_aucs = []
    for _, test_idx in splits:
        fold_y = y[test_idx]
        fold_aucs.append(float(roc_auc_score(fold_y, scores[test_idx])) if 0 < fold_y.sum() < len(fold_y) else None)
    result.update(auc=float(roc_auc_score(y, scores)), folds=used_folds, fold_aucs=fold_aucs,
                  null_sd=null_auc_sd(num_forget, num_approx))
    return result


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _length_summary(values: list[int]) -> dict:
    return {"mean": float(statistics.fmean(values)), "median": float(statistics.median(values))}


def _log_odds_dirichlet(counts_a: Counter, counts_b: Counter, top_k: int, min_count: int) -> tuple[list, list]:
    """Log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words", eq. 22).

    The prior is the pooled counts of both sets (alpha_w = y_aw + y_bw, alpha_0 = n_a + n_b), which shrinks rare
    n-grams hard toward zero. delta_w = log[(y_aw + a_w) / (n_a + a_0 - y_aw - a_w)] - (same for b);
    z_w = delta_w / sqrt(1/(y_aw + a_w) + 1/(y_bw + a_w)). Positive z: over-represented in a.
    """
    n_a, n_b = sum(counts_a.values()), sum(counts_b.values())
    alpha_0 = n_a + n_b
    rows = []
    for w in counts_a.keys() | counts_b.keys():
        y_a, y_b = counts_a.get(w, 0), counts_b.get(w, 0)
        if y_a + y_b < min_count:
            continue
        alpha_w = y_a + y_b
        rest_a, rest_b = n_a + alpha_0 - y_a - alpha_w, n_b + alpha_0 - y_b - alpha_w
        if rest_a <= 0 or rest_b <= 0:  # the n-gram is every token of the pooled sets: nothing to contrast it with
            continue
        delta = math.log((y_a + alpha_w) / rest_a) - math.log((y_b + alpha_w) / rest_b)
        z = delta / math.sqrt(1.0 / (y_a + alpha_w) + 1.0 / (y_b + alpha_w))
        rows.append((w, z, y_a, y_b))
    # Sort by z then by the n-gram itself so ties come out the same on every run.
    rows.sort(key=lambda r: (-r[1], r[0]))
    fmt = lambda r: {"ngram": r[0], "z": round(r[1], 4), "count_forget": r[2], "count_approx": r[3]}  # noqa: E731
    top_a = [fmt(r) for r in rows[:top_k] if r[1] > 0]
    top_b = [fmt(r) for r in sorted(rows, key=lambda r: (r[1], r[0]))[:top_k] if r[1] < 0]
    return top_a, top_b


def _ngram_counts(docs_words: list[list[str]]) -> Counter:
    counts: Counter = Counter()
    for words in docs_words:
        counts.update(words)
        counts.update(f"{a} {b}" for a, b in zip(words, words[1:]))
    return counts


def shift_statistics(forget_texts: Sequence[str], approx_texts: Sequence[str],
                     tokenize: Callable[[str], Sequence] | None = None, *, ttr_words: int = 1000, top_k: int = 15,
                     min_count: int = 3, seed: int = 0) -> dict:
    """Descriptive differences between the two sets, to explain a high blind AUC (or to spot a shift it missed).

    - length in characters (and in tokens when ``tokenize`` is given: any ``str -> sequence`` callable, e.g. a HF
      tokenizer's ``encode``): mean and median per set;
    - type-token ratio on a random sample of the same number of words from each set (``min(ttr_words, words in the
      smaller set)``, drawn with ``seed``): raw TTR falls with corpus size, so it is only comparable at a fixed size;
    - the ``top_k`` most distinguishing word uni- and bigrams each way, ranked by the z-scored log-odds ratio with an
      informative Dirichlet prior from the pooled counts (Monroe et al. 2008); n-grams seen fewer than ``min_count``
      times in total are skipped. |z| > ~2 is unusual for a single n-gram under no shift; many of them is a shift.
    - ``num_shared_documents``: approximate documents whose text (whitespace-stripped) also occurs in the forget set.

    Words are lowercased runs of word characters plus single punctuation marks.
    """
    forget_texts = _check_texts("forget_texts", forget_texts)
    approx_texts = _check_texts("approx_texts", approx_texts)
    if not forget_texts or not approx_texts:
        raise ValueError(f"both sets need at least one document; got {len(forget_texts)} forget and "
                         f"{len(approx_texts)} approximate")
    if ttr_words < 1:
        raise ValueError(f"ttr_words must be >= 1, got {ttr_words}")

    stats: dict = {"num_forget": len(forget_texts), "num_approx": len(approx_texts)}
    stats["chars"] = {"forget": _length_summary([len(t) for t in forget_texts]),
                      "approx": _length_summary([len(t) for t in approx_texts])}
    if tokenize is not None:
        stats["tokens"] = {"forget": _length_summary([len(tokenize(t)) for t in forget_texts]),
                           "approx": _length_summary([len(tokenize(t)) for t in approx_texts])}

    words_f = [_words(t) for t in forget_texts]
    words_a = [_words(t) for t in approx_texts]
    pooled_f = [w for ws in words_f for w in ws]
    pooled_a = [w for ws in words_a for w in ws]
    sample_size = min(ttr_words, len(pooled_f), len(pooled_a))
    rng = np.random.default_rng(seed)

    def ttr(pooled: list[str]) -> float | None:
        if sample_size == 0:
            return None
        idx = rng.choice(len(pooled), size=sample_size, replace=False)
        return len({pooled[i] for i in idx}) / sample_size

    stats["type_token_ratio"] = {"forget": ttr(pooled_f), "approx": ttr(pooled_a), "sample_words": sample_size}

    top_f, top_a = _log_odds_dirichlet(_ngram_counts(words_f), _ngram_counts(words_a), top_k, min_count)
    stats["distinguishing_ngrams"] = {
        "method": "log-odds ratio, informative Dirichlet prior from pooled counts (Monroe et al. 2008), z-scored",
        "forget": top_f, "approx": top_a,
    }
    forget_set = {t.strip() for t in forget_texts}
    stats["num_shared_documents"] = sum(t.strip() in forget_set for t in approx_texts)
    return stats


_REMEDY_SPLIT = ("Build both sets from one source with a random document-level split: draw the documents of one corpus "
                 "(same time span, same sources, same preprocessing), hold a random subset out of training entirely "
                 "and use it as the approximate set; never split by date, by source, or inside a document.")
_REMEDY_DEDUP = ("Deduplicate the approximate set against the forget set and the training data (exact and near "
                 "duplicates) so that 'unseen' documents really were unseen.")
_REMEDY_LENGTH = ("Truncate or chunk both sets the same way (same chunk length, same cleaning) so length and "
                  "formatting cannot tell them apart.")
_REMEDY_RETRAIN = ("Where affordable, compare against a retrained reference: a model trained from the same start "
                   "without the forget set. Its behaviour on the forget set is the target itself, with no stand-in "
                   "set needed.")
_REMEDY_MEMBERS = ("Check that the forget set really was in the original model's training data (with enough exposure "
                   "to be learnt) and that the approximate set was not; if the original model fits both equally, "
                   "there is no membership signal to remove and forgetting cannot be measured.")
_REMEDY_SIZE = "Use more documents per set (at least a few dozen each) so the blind check can be run and resolved."


@dataclass(frozen=True)
class ShiftReport:
    """Outcome of :func:`check_split`. ``passed`` is True only when every check that could run passed."""

    passed: bool
    """True when the blind AUC is inside the band, the loss gap (if losses were given) is above the minimum and the
    sets share no more documents than allowed."""
    reasons: list[str] = field(default_factory=list)
    """One plain-language sentence per failed check; empty when passed."""
    blind_auc: dict = field(default_factory=dict)
    """The full :func:`blind_baseline_auc` result (``blind_auc["auc"]`` is the number)."""
    loss_gap: float | None = None
    """Original model's mean loss on the approximate set minus on the forget set; None when losses were not given."""
    stats: dict = field(default_factory=dict)
    """The :func:`shift_statistics` result."""
    remedies: list[str] = field(default_factory=list)
    """What to do about the failed checks; empty when passed."""
    notes: list[str] = field(default_factory=list)
    """Caveats that do not fail the check (e.g. sets too small to resolve the AUC band)."""
    settings: dict = field(default_factory=dict)
    """The thresholds the check ran with."""

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    def to_markdown(self) -> str:
        """A short human-readable report: verdict, reasons, numbers, distinguishing n-grams, remedies."""
        s, b = self.settings, self.blind_auc
        lines = [f"## Approximate-set check: {'PASS' if self.passed else 'FAIL'}", ""]
        for r in self.reasons:
            lines.append(f"- {r}")
        if self.reasons:
            lines.append("")
        auc = "n/a" if b.get("auc") is None else f"{b['auc']:.3f}"
        lo, hi = 0.5 - s.get("auc_band", 0.0), 0.5 + s.get("auc_band", 0.0)
        lines += ["| check | value | criterion |", "|---|---|---|",
                  f"| blind AUC ({b.get('folds', 0)}-fold, {b.get('num_forget')} forget / {b.get('num_approx')} "
                  f"approx) | {auc} | in [{lo:.2f}, {hi:.2f}] |"]
        if b.get("null_sd") is not None:
            lines.append(f"| random-scorer AUC sd at these sizes | {b['null_sd']:.3f} | (noise scale) |")
        if self.loss_gap is not None:
            lines.append(f"| loss gap (approx - forget) | {self.loss_gap:.4f} | > {s.get('min_loss_gap', 0.0)} |")
        st = self.stats
        if st:
            lines.append(f"| shared documents | {st['num_shared_documents']} | <= "
                         f"{s.get('max_shared_fraction', 0.0):.0%} of approx |")
            c = st["chars"]
            lines.append(f"| mean / median chars (forget; approx) | {c['forget']['mean']:.0f} / "
                         f"{c['forget']['median']:.0f}; {c['approx']['mean']:.0f} / {c['approx']['median']:.0f} | |")
            if "tokens" in st:
                t = st["tokens"]
                lines.append(f"| mean / median tokens (forget; approx) | {t['forget']['mean']:.0f} / "
                             f"{t['forget']['median']:.0f}; {t['approx']['mean']:.0f} / "
                             f"{t['approx']['median']:.0f} | |")
            ttr = st["type_token_ratio"]
            if ttr["forget"] is not None:
                lines.append(f"| type-token ratio @ {ttr['sample_words']} words (forget; approx) | "
                             f"{ttr['forget']:.3f}; {ttr['approx']:.3f} | |")
            ng = st["distinguishing_ngrams"]
            for side in ("forget", "approx"):
                top = ", ".join(f"`{r['ngram']}` ({r['z']:+.1f})" for r in ng[side][:8] if abs(r["z"]) >= 1.96)
                lines.append(f"\nMost {side}-typical n-grams (log-odds z, |z| >= 1.96): {top or 'none'}")
        for heading, items in (("Remedies", self.remedies), ("Notes", self.notes)):
            if items:
                lines += ["", f"### {heading}"] + [f"- {x}" for x in items]
        return "\n".join(lines) + "\n"


def _mean_loss(name: str, loss) -> float:
    if isinstance(loss, (int, float)):
        value = float(loss)
    else:
        values = [float(x) for x in loss]
        if not values:
            raise ValueError(f"{name} is an empty sequence")
        value = statistics.fmean(values)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_split(forget_texts: Sequence[str], approx_texts: Sequence[str], forget_loss=None, approx_loss=None,
                auc_band: float = 0.1, min_loss_gap: float = 0.0, *, seed: int = 0, folds: int = 5,
                tokenize: Callable[[str], Sequence] | None = None,
                max_shared_fraction: float = 0.0, strata: Sequence | None = None) -> ShiftReport:
    """Is ``approx_texts`` a fair stand-in for retraining, as judged against ``forget_texts``?

    Fails (``passed=False``, one plain-language reason each) when
    1. the blind-baseline AUC (:func:`blind_baseline_auc`) is outside ``0.5 +- auc_band``: the text alone tells the
       sets apart, so any membership-inference AUC or loss gap measured on them mixes in that shift; or it cannot be
       computed (too few documents);
    2. ``forget_loss`` and ``approx_loss`` are given (the *original* model's mean loss, or per-document losses that are
       averaged) and ``approx_loss - forget_loss <= min_loss_gap``: the model does not fit its training documents
       better than unseen ones, so there is no membership signal to remove;
    3. more than ``max_shared_fraction`` of the approximate documents also occur verbatim in the forget set.

    ``stats`` (:func:`shift_statistics`) and ``remedies`` explain and fix a failure. Give both losses or neither.
    """
    forget_texts = _check_texts("forget_texts", forget_texts)
    approx_texts = _check_texts("approx_texts", approx_texts)
    if not forget_texts or not approx_texts:
        raise ValueError(f"both sets need documents; got {len(forget_texts)} forget and "
                         f"{len(approx_texts)} approximate")
    if not 0.0 <= auc_band <= 0.5:
        raise ValueError(f"auc_band must be in [0, 0.5], got {auc_band}")
    if not 0.0 <= max_shared_fraction <= 1.0:
        raise ValueError(f"max_shared_fraction must be in [0, 1], got {max_shared_fraction}")
    if (forget_loss is None) != (approx_loss is None):
        raise ValueError("give both forget_loss and approx_loss (the original model's losses), or neither")

    blind = blind_baseline_auc(forget_texts, approx_texts, seed=seed, folds=folds, strata=strata)
    stats = shift_statistics(forget_texts, approx_texts, tokenize=tokenize, seed=seed)
    reasons: list[str] = []
    remedies: list[str] = []
    notes: list[str] = []

    auc = blind["auc"]
    if auc is None:
        reasons.append(f"The blind check could not run ({blind['reason']}), so the split is unverified.")
        remedies.append(_REMEDY_SIZE)
    elif abs(auc - 0.5) > auc_band:
        # Far below 0.5 fails too: it is not the signature of identical distributions. (Out-of-fold AUC under no
        # shift is biased slightly below 0.5 at small n, ~0.49 at 60 a side; the band absorbs that.)
        reasons.append(
            f"A classifier that never sees the model tells forget from approximate documents by their text alone "
            f"(cross-validated AUC {auc:.3f}; chance is 0.5 and the allowed range is "
            f"{0.5 - auc_band:.2f}-{0.5 + auc_band:.2f}). "
            f"The sets differ in more than membership (topic, style, vocabulary or length), so membership-inference "
            f"AUCs and loss gaps on them would partly measure that difference.")
        remedies += [_REMEDY_SPLIT, _REMEDY_LENGTH, _REMEDY_DEDUP, _REMEDY_RETRAIN]
    if auc is not None and blind["null_sd"] * 2 > auc_band:
        # null_sd is the Mann-Whitney sd of one fixed random scorer; the cross-validated AUC varies ~1.3-1.7x more
        # (measured: sd 0.068 at 60 a side, 0.041 at 200), so this note is conservative.
        notes.append(f"With {blind['num_forget']} forget and {blind['num_approx']} approximate documents a random "
                     f"scorer's AUC has sd {blind['null_sd']:.3f} (the cross-validated AUC varies more), so a band of "
                     f"+-{auc_band} is within noise (under 2 sd): a valid split can fail by chance. More documents "
                     f"would make the check sharper.")

    loss_gap = None
    if forget_loss is not None:
        loss_gap = _mean_loss("approx_loss", approx_loss) - _mean_loss("forget_loss", forget_loss)
        if loss_gap <= min_loss_gap:
            reasons.append(
                f"The original model's loss on the unseen approximate set is not higher than on the forget set "
                f"(gap {loss_gap:+.4f}, need > {min_loss_gap}). Either the forget documents were not learnt as "
                f"members or the approximate set is easier text; either way the gap cannot show forgetting.")
            remedies.append(_REMEDY_MEMBERS)
            if _REMEDY_SPLIT not in remedies:
                remedies += [_REMEDY_SPLIT, _REMEDY_RETRAIN]

    shared = stats["num_shared_documents"]
    if shared > max_shared_fraction * len(approx_texts):
        reasons.append(f"{shared} of {len(approx_texts)} approximate documents also appear verbatim in the forget "
                       f"set: they are members labelled as unseen.")
        if _REMEDY_DEDUP not in remedies:
            remedies.append(_REMEDY_DEDUP)

    settings = {"auc_band": auc_band, "min_loss_gap": min_loss_gap, "seed": seed, "folds": folds,
                "max_shared_fraction": max_shared_fraction}
    return ShiftReport(passed=not reasons, reasons=reasons, blind_auc=blind, loss_gap=loss_gap, stats=stats,
                       remedies=remedies, notes=notes, settings=settings)
