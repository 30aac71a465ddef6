"""attack_report: orientation (no folding), TPR at fixed FPR, balanced accuracy; and the plots render."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsunlearn.eval.mia import attack_report, tpr_at_fpr
from dsunlearn.eval.plots import plot_loss_histograms, plot_roc, plot_split_losses_over_steps


def test_perfect_separation_auc_one_and_swapped_zero():
    members, nonmembers = [5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0]
    r = attack_report(members, nonmembers)
    assert r["auc"] == 1.0
    assert r["balanced_accuracy"] == 1.0
    assert r["tpr_at_1pct_fpr"] == 1.0 and r["tpr_at_5pct_fpr"] == 1.0
    swapped = attack_report(nonmembers, members)
    assert swapped["auc"] == 0.0  # not folded to 1.0
    assert swapped["tpr_at_1pct_fpr"] == 0.0
    assert (r["num_members"], r["num_nonmembers"]) == (3, 4)
    assert r["fpr"][0] == 0.0 and r["fpr"][-1] == 1.0 and len(r["fpr"]) == len(r["tpr"])


def test_chance_and_torch_input():
    r = attack_report(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert r["auc"] == 0.5 and r["balanced_accuracy"] == 0.5


def test_tpr_at_fpr_hand_made():
    # 100 non-members scored 0..99, 10 members. FPR <= 1% allows the single top non-member (99) above threshold.
    nonmembers = np.arange(100, dtype=float)
    members = np.array([150, 140, 98.5, 130, 120, 97.5, 96.5, 20, 10, 0.5])
    r = attack_report(members, nonmembers)
    # threshold 98.5: 5 members (150,140,130,120,98.5) + 1 non-member (99) -> TPR .5 at FPR .01;
    # threshold 95: members above = 7, non-members 95..99 = 5 -> FPR .05, TPR .7.
    assert r["tpr_at_1pct_fpr"] == pytest.approx(0.5)
    assert r["tpr_at_5pct_fpr"] == pytest.approx(0.7)
    # AUC: each member's share of non-members it beats, a tie counting one half (members 20 and 10 tie).
    expected_auc = np.mean([(nonmembers < m).mean() + 0.5 * (nonmembers == m).mean() for m in members])
    assert r["auc"] == pytest.approx(expected_auc)
    # No interpolation: a target between ROC points takes the last point at or below it.
    fpr, tpr = np.array([0.0, 0.0, 0.02, 0.5, 1.0]), np.array([0.0, 0.3, 0.6, 0.9, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.3
    assert tpr_at_fpr(fpr, tpr, 0.02) == 0.6


def test_balanced_accuracy_hand_made():
    # Best threshold 2.5: TPR 2/3, TNR 1 -> 5/6; threshold 0.5: TPR 1, TNR 1/3 -> 2/3.
    r = attack_report([3.0, 4.0, 1.0], [0.0, 1.0, 2.0])
    assert r["balanced_accuracy"] == pytest.approx(5 / 6)


def test_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="empty"):
        attack_report([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        attack_report([1.0, float("nan")], [0.0])


def test_plots_write_pngs(tmp_path):
    r = attack_report([3.0, 4.0, 1.0], [0.0, 1.0, 2.0])
    paths = [
        plot_roc({"loss": (r["fpr"], r["tpr"], r["auc"])}, tmp_path / "roc.png"),
        plot_loss_histograms([1.0, 2.0, 2.5], [3.0, 3.5], tmp_path / "h.png", retrained=[3.1, 3.3]),
        plot_split_losses_over_steps([{"step": 0, "forget": 2.0, "retain": 2.1}, {"step": 10, "forget": 3.0}],
                                     tmp_path / "sub" / "steps.png", targets={"retrained forget": 3.2}),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zlib_texts_are_decoded_without_special_tokens(toy_world):
    """mia_zlib compresses each chunk's text: the text, not the EOS/BOS/pad markers the chunks carry as ids."""
    from transformers import AutoTokenizer

    from dsunlearn.config import RunConfig, from_dict
    from dsunlearn.data import load_stream
    from dsunlearn.eval.runner import load_eval_splits
    tok = AutoTokenizer.from_pretrained(toy_world["model"])
    cfg = from_dict(RunConfig, {"model": {"path": toy_world["model"]},
                                "data": {"forget": toy_world["forget"], "retain": toy_world["retain"],
                                         "approximate": None, "general": None, "seq_len": 64}})
    streams = {"forget": load_stream("forget", toy_world["forget"], cfg.data, tok)}
    split = load_eval_splits(cfg, tok, streams)["forget"]
    assert any(tok.eos_token_id in ids for ids in split.input_ids)  # chunks end their documents with EOS
    markers = [t for t in tok.all_special_tokens if t]
    assert not any(m in text for text in split.texts for m in markers)
    assert split.texts == [tok.decode(ids, skip_special_tokens=True) for ids in split.input_ids]
