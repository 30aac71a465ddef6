"""GPU checks (skipped without CUDA): ZeRO-3 vs ZeRO-0 loss trajectories in bf16 on the accelerator."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from helpers import REPO, free_port, launch_env, write_run_config, deepspeed_launcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_env():
    env = launch_env()
    env.pop("DS_ACCELERATOR", None)  # DeepSpeed picks CUDA
    return env


def _run(cfg, zero, tmp_path):
    import subprocess
    p = subprocess.run(deepspeed_launcher(1) + ["--module", "dsunlearn",
                        "unlearn", "--config", str(cfg), "--zero", str(zero)],
                       env=_gpu_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]


def test_zero3_bf16_matches_zero0_bf16(toy_world, tmp_path):
    zero0 = tmp_path / "zero0.json"
    zero0.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    losses = {}
    for name, zero in (("z3", REPO / "ds_configs" / "zero3.json"), ("z0", zero0)):
        cfg = write_run_config(tmp_path / f"{name}.json", toy_world, tmp_path / name,
                               train={"micro_batch_size": 4, "num_steps": 5, "lr": 1e-3})
        _run(cfg, zero, tmp_path)
        losses[name] = [json.loads(l)["loss/total"] for l in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    for a, b in zip(losses["z3"], losses["z0"]):
        assert abs(a - b) <= 2e-2 * max(1.0, abs(a)), (losses["z3"], losses["z0"])
