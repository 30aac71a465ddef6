"""GPU checks (skipped without CUDA): ZeRO-3 vs ZeRO-0 loss trajectories in bf16 on the accelerator; the row-blocked
loss math on bf16 logits at a 128k vocabulary."""
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


def test_blocked_loss_math_on_the_gpu_matches_the_whole_tensor_formula():
    """bf16 logits on CUDA at a Llama-3-sized vocabulary: values within fp32 rounding, gradient in bf16 equal to the
    rounded fp32 gradient of the whole-tensor formula, and peak memory below one fp32 copy of the logits."""
    from dsunlearn.methods.terms import chunk_nll
    torch.manual_seed(0)
    batch, seq, vocab = 2, 512, 128256
    logits = torch.randn(batch, seq, vocab, device="cuda").bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    nll = chunk_nll(logits, labels).sum()
    nll.backward()
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < batch * seq * vocab * 4, f"{peak / 2**20:.0f} MiB: at least one fp32 copy of the logits was made"
    exact = logits.detach().float().requires_grad_()
    lp = exact[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    (-lp.mean(-1)).sum().backward()
    torch.testing.assert_close(nll.float(), (-lp.mean(-1)).sum().detach(), rtol=1e-5, atol=1e-4)
    # Within one bf16 rounding step (2^-8 relative) of the fp32 gradient: GPU kernels may round per-row sums
    # differently for differently shaped blocks.
    torch.testing.assert_close(logits.grad.float(), exact.grad, rtol=2 ** -7, atol=1e-9)
