"""`dsunlearn audit` on 2 ZeRO-3 CPU ranks gives the 1-rank figures: the relearning curve (same global batches, a
sharded fine-tune) and the quantized scores (every matrix gathered and quantized on every rank, rank 0's result
re-partitioned), with the same groups (one scale per row where the group size does not divide the width)."""
from __future__ import annotations

import json

import pytest

from helpers import CPU_ZERO3, deepspeed_launcher, run_cli, write_run_config


@pytest.fixture(scope="module")
def audits(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_dist")
    cfg = write_run_config(root / "run.json", toy_world, root / "unused", eval={"micro_batch_size": 4},
                           audit={"relearn_steps": 3, "relearn_batch_size": 4, "quantize_bits": [4],
                                  "quantize_group_size": 64})  # down_proj (160 inputs): per row
    out = {}
    for ranks in (1, 2):
        args = ["audit", "--config", str(cfg), "--zero", CPU_ZERO3, "--model", toy_world["model"],
                "--out", str(root / f"r{ranks}")]
        p = run_cli(args, launcher=deepspeed_launcher(2) if ranks == 2 else None)
        assert p.returncode in (0, 1), p.stdout[-2000:] + p.stderr[-3000:]  # 1: an audit failed (a result)
        out[ranks] = json.loads((root / f"r{ranks}" / "metrics.json").read_text())["audits"]
    return out


def test_two_ranks_relearning_curve_equals_one_rank(audits):
    one, two = audits[1]["relearn"], audits[2]["relearn"]
    for curve in ("model", "baseline_curve"):
        assert two[curve]["batches"] == one[curve]["batches"]  # the same chunks, step by step
        for a, b in zip(one[curve]["points"], two[curve]["points"], strict=True):
            for split, loss in a["losses"].items():
                assert b["losses"][split] == pytest.approx(loss, rel=1e-5), (curve, a["step"], split)
            if a["train_loss"] is not None:
                assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5), (curve, a["step"])
            for attack, auc in a["aucs"].items():
                assert b["aucs"][attack] == pytest.approx(auc, abs=2e-3), (curve, a["step"], attack)
    assert two["model_steps_to_relearn"] == one["model_steps_to_relearn"]
    assert two["threshold"] == pytest.approx(one["threshold"], rel=1e-6)


def test_two_ranks_quantized_scores_equal_one_rank(audits):
    one, two = audits[1]["quantize"], audits[2]["quantize"]
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert a["bits"] == b["bits"]
        for split, loss in a["losses"].items():
            assert b["losses"][split] == pytest.approx(loss, rel=1e-5), (a["bits"], split)
        assert b["strongest_auc"] == pytest.approx(a["strongest_auc"], abs=1e-9)
    assert one["rows"][1]["loss_change"]["forget"] != 0  # 4-bit weights really were scored
    assert two["groups"] == one["groups"] == {"64": 13, "160": 2}
