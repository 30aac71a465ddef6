"""LoRA unlearning on 2 ZeRO-3 CPU ranks gives the 1-rank run: GA+KL with theta_0 from the adapters switched off
(``reference.mode = "adapters_off"``), the same global batch, every term step by step, and the merged export."""
from __future__ import annotations

import pytest
import torch

from helpers import CPU_ZERO3, deepspeed_launcher, run_cli, write_run_config
from test_engine_dist import NUM_STEPS, assert_same_losses


@pytest.fixture(scope="module")
def lora_runs(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dist")
    out = {}
    for ranks, micro in ((1, 4), (2, 2)):
        cfg = write_run_config(root / f"r{ranks}.json", toy_world, root / f"r{ranks}", method={"name": "ga_kl"},
                               adapter={"rank": 4, "alpha": 8.0},
                               train={"micro_batch_size": micro, "num_steps": NUM_STEPS, "lr": 5e-3})
        p = run_cli(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3],
                    launcher=deepspeed_launcher(2) if ranks == 2 else None)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        out[ranks] = root / f"r{ranks}"
    return out


def test_two_ranks_lora_run_matches_one_rank(lora_runs):
    assert_same_losses(lora_runs[1], lora_runs[2])


def test_two_ranks_lora_export_matches_one_rank(lora_runs, toy_world):
    from safetensors.torch import load_file
    one = load_file(lora_runs[1] / "model" / "model.safetensors")
    two = load_file(lora_runs[2] / "model" / "model.safetensors")
    original = load_file(f"{toy_world['model']}/model.safetensors")
    assert set(one) == set(two) == set(original)  # merged: the original's names, no adapter left
    for key, value in one.items():
        assert torch.allclose(two[key], value, atol=1e-6), key
    assert not torch.equal(one["model.layers.0.mlp.down_proj.weight"], original["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(one["model.norm.weight"], original["model.norm.weight"])
