"""Is the forget set forgotten? One judgement for the verdict, the stop rule, the exported step and the sweep.

An evaluation is judged on three criteria, each with a default the user can change (``eval.*``):

1. **Forget loss at the target**, a one-sided crossing: ``forget loss >= target - eval.stop_tolerance`` (the target is
   ``eval.stop_target``, by default the original model's loss on unseen in-distribution text, moved by the base
   model's forget - approximate gap when ``eval.base_model`` is set). A forget loss far above
   the target is not rewarded: it shows up in criterion 2 as attacks that rank forget chunks *below* unseen ones.
2. **No attack tells forget from unseen text** better than it should. The strongest attack is the largest AUC over
   every membership score (LOSS, zlib, every Min-K% and Min-K%++ k, the reference attack). With a retrained twin the
   reference level is the twin's strongest attack, its own reference attack left out (0.5 by construction: it is
   calibrated by the twin itself); without one it is the base model's (``eval.base_model``, the model before the
   forget set: how far the forget text stands out by nature), else 0.5. The band is ``eval.auc_band``, by default twice the standard
   deviation of a random scorer's AUC at these set sizes, ``2 sqrt((n1 + n2 + 1) / (12 n1 n2))`` (Mann-Whitney under
   H0; the split check uses the same null), at least 0.05. The weakest attack is held to the mirror bound: an AUC
   below the reference level minus the band means the forget set now stands out as *harder* than unseen text
   (over-unlearned; the "Streisand effect").
3. **Utility kept**: retain and approximate loss at most ``eval.utility_tolerance`` (relative, default 3%) above the
   original model's (in a chain of removal requests, the chain's original, not the previous request's result).
4. **No verbatim recitation** (the final verdict only, when generation is on: ``with_verbatim_criterion``): the
   exported model's forget VerbMem within two standard errors (at least 0.05) of the twin's, else of the original's
   VerbMem on the approximate set.

Distance to retraining, as the field reports it (next to the AUCs, not part of the criteria):
- PrivLeak (MUSE, Shi et al. 2024, arXiv:2407.06460): ``(AUC_unlearned - AUC_retrained) / AUC_retrained`` for the
  strongest attack, signed: over-unlearning is negative, under-unlearning positive. Without a twin AUC_retrained = 0.5.
- Forget quality (TOFU, Maini et al. 2024, arXiv:2401.06121): the p-value of a two-sample Kolmogorov-Smirnov test
  between the per-chunk forget losses of the unlearned model and of the twin (high = indistinguishable).

"Cannot judge" when the state before unlearning already fails the rule: its forget loss is at or above the target
(nothing left to remove, or the unseen set is not like the forget set), or the split check failed.
"""
from __future__ import annotations

import math
from typing import Optional

from scipy.stats import ks_2samp

from .shift import null_auc_sd

MEMBER_SPLIT, NONMEMBER_SPLIT = "forget", "approximate"
UTILITY_SPLITS = ("retain", "approximate")
REFERENCE_ATTACK = "ref"
MIN_AUC_BAND = 0.05

FORGOTTEN, NOT_FORGOTTEN, OVER_UNLEARNED, CANNOT_JUDGE = "forgotten", "not yet forgotten", "over-unlearned", \
    "cannot judge"


def null_auc_band(num_members: int, num_nonmembers: int) -> float:
    """Two standard deviations of a random scorer's AUC at these set sizes (the split check's null), at least
    ``MIN_AUC_BAND``."""
    return max(MIN_AUC_BAND, 2 * null_auc_sd(num_members, num_nonmembers))


def forget_shortfall(forget_loss: float, target: float, stop_tolerance: float) -> float:
    """Nats the forget loss still lacks to reach ``target - stop_tolerance``: 0 once it has crossed (one-sided). The
    verdict's first criterion and the stop rule's trigger."""
    return max(0.0, (target - stop_tolerance) - forget_loss)


def attack_name(key: str) -> str:
    """``min_k_10`` -> ``Min-K% (k=10)``, ``min_k_pp_20`` -> ``Min-K%++ (k=20)``, ``loss`` -> ``the LOSS attack``."""
    if key.startswith("min_k_pp_"):
        return f"Min-K%++ (k={key[9:]})"
    if key.startswith("min_k_"):
        return f"Min-K% (k={key[6:]})"
    return {"loss": "the LOSS attack", "zlib": "the zlib attack", "ref": "the reference-model attack"}.get(key, key)


def extreme_attacks(mia: dict, exclude: tuple = ()) -> tuple[tuple[str, float], tuple[str, float]]:
    """((strongest attack, its AUC), (weakest attack, its AUC)) over the attacks not in ``exclude``."""
    aucs = {k: v["auc"] for k, v in mia.items() if k not in exclude}
    strongest = max(aucs, key=lambda k: (aucs[k], k))
    weakest = min(aucs, key=lambda k: (aucs[k], k))
    return (strongest, aucs[strongest]), (weakest, aucs[weakest])


def unseen_like_levels(result: dict, twin: Optional[dict], auc_band: Optional[float]) -> tuple[float, float, float]:
    """(the twin's strongest attack AUC, its weakest, the band): criterion 2's reference levels for ``result``.

    The twin's own reference attack is left out (0.5 by construction); without a twin both levels are 0.5. A band of
    None is the null band at ``result``'s set sizes (``null_auc_band``)."""
    if twin and twin.get("mia"):
        (_, high), (_, low) = extreme_attacks(twin["mia"], exclude=(REFERENCE_ATTACK,))
    else:
        high = low = 0.5
    if auc_band is None:
        splits = result["splits"]
        auc_band = null_auc_band(splits[MEMBER_SPLIT]["num_chunks"], splits[NONMEMBER_SPLIT]["num_chunks"]) \
            if NONMEMBER_SPLIT in splits and "num_chunks" in splits.get(MEMBER_SPLIT, {}) else MIN_AUC_BAND
    return high, low, auc_band


def privleak(auc: float, reference_auc: float) -> float:
    """MUSE's PrivLeak: the signed relative AUC difference to the retrained model's (or to 0.5 without one)."""
    return (auc - reference_auc) / reference_auc


def forget_quality(chunk_losses: list, twin_chunk_losses: list) -> float:
    """TOFU's forget quality: the KS two-sample p-value between the two models' per-chunk forget losses."""
    return float(ks_2samp(chunk_losses, twin_chunk_losses).pvalue)


def distance_to_retraining(result: dict, twin: Optional[dict]) -> dict:
    """PrivLeak for the strongest attack on ``result`` (and per attack) and, with a twin, the KS forget quality."""
    out: dict = {}
    if result.get("mia"):
        (name, auc), _ = extreme_attacks(result["mia"])
        ref = {k: v["auc"] for k, v in twin["mia"].items()} if twin and twin.get("mia") else {}
        out["privleak_attack"] = name
        out["privleak"] = privleak(auc, ref.get(name, 0.5))
        out["privleak_per_attack"] = {k: privleak(v["auc"], ref.get(k, 0.5)) for k, v in result["mia"].items()}
    chunks = result.get("chunk_loss", {}).get(MEMBER_SPLIT)
    twin_chunks = (twin or {}).get("chunk_loss", {}).get(MEMBER_SPLIT)
    if chunks and twin_chunks:
        out["forget_quality"] = forget_quality(chunks, twin_chunks)
    return out


def judge(result: dict, before: Optional[dict], twin: Optional[dict], *, stop_tolerance: float,
          utility_tolerance: float, auc_band: Optional[float], split_check: Optional[dict] = None,
          original: Optional[dict] = None, exclude_attacks: tuple = ()) -> dict:
    """The judgement of one evaluation (``result``, with ``target`` set) against the state before unlearning
    (``before``) and the retrained twin (``twin``, optional; or the base model, whose attack levels stand in for a
    missing twin's). Utility is measured against ``original`` when given (a
    later removal request: the chain's original model, so damage cannot accumulate unjudged), else ``before``.
    Returns ``status`` (one of the four words above), ``ok`` (forgotten), ``reasons`` (one line each, with numbers),
    the figures behind them, and ``distance`` (0 when every criterion holds, else how far off, in comparable units:
    nats of forget shortfall, relative utility excess, AUC excess). ``exclude_attacks``: attacks left out of
    criterion 2 (the selection judgement leaves out the reference attack, which the twin calibrates).
    """
    out: dict = {"status": CANNOT_JUDGE, "ok": False, "reasons": [], "distance": math.inf}
    target = result.get("target")
    splits = result["splits"]
    if target is None or MEMBER_SPLIT not in splits:
        out["reasons"].append("no target: set data.approximate (or eval.retrained_model with "
                              "eval.stop_target='retrained_forget')")
        return out
    if before is not None and before["splits"][MEMBER_SPLIT]["loss"] >= target - stop_tolerance:
        out["reasons"].append(f"before unlearning the forget loss {before['splits'][MEMBER_SPLIT]['loss']:.3f} is "
                              f"already at or above the target {target:.3f}: the forget set already looks unseen "
                              f"(or the unseen set is harder text than the forget set)")
        return out
    if split_check is not None and not split_check.get("passed", True):
        out["reasons"].append("the split check failed: the approximate set is not a fair stand-in for unseen text ("
                              + "; ".join(split_check.get("reasons", [])) + ")")
        return out

    forget = splits[MEMBER_SPLIT]["loss"]
    shortfall = forget_shortfall(forget, target, stop_tolerance)
    over, under = [], []
    if shortfall > 0:
        under.append(f"forget loss {forget:.3f} below the target {target:.3f} ({forget - target:+.3f} nats)")
    excess = 0.0
    figures: dict = {"forget_loss": forget, "target": target}
    if result.get("mia"):
        (strong, strong_auc), (weak, weak_auc) = extreme_attacks(result["mia"], exclude=exclude_attacks)
        ref_high, ref_low, auc_band = unseen_like_levels(result, twin, auc_band)
        figures.update(strongest_attack=strong, strongest_auc=strong_auc, weakest_attack=weak, weakest_auc=weak_auc,
                       unseen_like_high=ref_high + auc_band, unseen_like_low=ref_low - auc_band, auc_band=auc_band)
        if strong_auc > ref_high + auc_band:
            excess += strong_auc - (ref_high + auc_band)
            lead = "forget loss at target, but " if shortfall == 0 else ""
            under.append(f"{lead}{attack_name(strong)} still separates forget from unseen text: AUC "
                         f"{strong_auc:.3f}, unseen-like is <= {ref_high + auc_band:.3f}")
        if weak_auc < ref_low - auc_band:
            excess += (ref_low - auc_band) - weak_auc
            over.append(f"{attack_name(weak)} ranks forget chunks as harder than unseen text: AUC {weak_auc:.3f}, "
                        f"unseen-like is >= {ref_low - auc_band:.3f}")
    base = original or before
    if base is not None:
        for name in UTILITY_SPLITS:
            if name in splits and name in base["splits"]:
                was, now = base["splits"][name]["loss"], splits[name]["loss"]
                rise = (now - was) / was
                figures[f"{name}_rise"] = rise
                if rise > utility_tolerance:
                    excess += rise - utility_tolerance
                    over.append(f"{name} {now - was:+.3f} nats ({100 * rise:+.1f}%, tolerance "
                                f"{100 * utility_tolerance:.0f}%)")
    out.update(figures=figures, distance=shortfall + excess, ok=not over and not under)
    out["status"] = FORGOTTEN if out["ok"] else OVER_UNLEARNED if over else NOT_FORGOTTEN
    out["reasons"] = over + under
    return out


def with_verbatim_criterion(judgement: dict, reference: str, forget: list, unseen_like: list, band: float) -> dict:
    """The judgement with criterion 4, verbatim memorisation (checked once, at the end of a run: the generation it
    needs is not repeated at every evaluation, so it never chooses the exported step): the exported model's forget
    VerbMem (mean ROUGE-L F1 of ``forget``) within ``band`` of the unseen-like level (mean of ``unseen_like``: the
    twin's forget VerbMem, else the original's on the approximate set). Above it the model still recites the text
    (not yet forgotten); below it, it writes less of the forget text than of text it never saw (over-unlearned). A
    judgement that cannot judge is returned unchanged."""
    if judgement["status"] == CANNOT_JUDGE:
        return judgement
    out = {**judgement, "figures": dict(judgement["figures"]), "reasons": list(judgement["reasons"])}
    now, level = sum(forget) / len(forget), sum(unseen_like) / len(unseen_like)
    out["figures"].update(verbmem_forget=now, verbmem_unseen_like=level, verbmem_band=band,
                          verbmem_reference=reference)
    if abs(now - level) <= band:
        return out
    if now > level:
        out["reasons"].append(f"VerbMem on forget {now:.3f} above {reference} {level:.3f} + band {band:.3f}: the "
                              f"model still recites the forget text")
        status = NOT_FORGOTTEN
    else:
        out["reasons"].append(f"VerbMem on forget {now:.3f} below {reference} {level:.3f} - band {band:.3f}: it "
                              f"writes less of the forget text than of unseen text")
        status = OVER_UNLEARNED
    out["ok"] = False
    out["distance"] = judgement["distance"] + abs(now - level) - band
    out["status"] = OVER_UNLEARNED if OVER_UNLEARNED in (status, judgement["status"]) else status
    return out


def verdict_line(judgement: dict) -> str:
    """One line for the report and the console: the status and every reason behind it."""
    status, reasons = judgement["status"], judgement["reasons"]
    if status == FORGOTTEN:
        f = judgement["figures"]
        parts = [f"forget loss {f['forget_loss']:.3f} at the target {f['target']:.3f}"]
        if "strongest_attack" in f:
            parts.append(f"strongest attack {attack_name(f['strongest_attack'])} AUC {f['strongest_auc']:.3f} "
                         f"(unseen-like <= {f['unseen_like_high']:.3f})")
        parts += [f"{n} {100 * f[n + '_rise']:+.1f}%" for n in UTILITY_SPLITS if n + "_rise" in f]
        if "verbmem_forget" in f:
            parts.append(f"VerbMem {f['verbmem_forget']:.3f} (unseen-like {f['verbmem_unseen_like']:.3f} +- "
                         f"{f['verbmem_band']:.3f})")
        return "forgotten: " + "; ".join(parts)
    return f"{status}: " + "; ".join(reasons)
