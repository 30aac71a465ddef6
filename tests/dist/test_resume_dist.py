"""Kill a 2-rank ZeRO-3 run with SIGKILL after a checkpoint, resume it, and land on the uninterrupted weights.

One case, GA+KL with a cached reference: it takes every step of the plain case (checkpoint, kill, resume, each step
logged once, the same weights) and also rebuilds theta_0's cache after the kill. Plain GA+GD resumes are covered on one
rank by tests/unit/test_chain.py and through the phases by tests/dist/test_phases_dist.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import CPU_ZERO3, REPO, free_port, launch_env, run_cli, write_run_config, deepspeed_launcher

NUM_STEPS = 15


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _launcher():
    return deepspeed_launcher(2)


CASES = {
    # theta_0's cache deleted after the kill: the resume must rebuild it from theta_0 (before loading the checkpoint),
    # not from the half-unlearned weights, or the KL targets and so the final weights would differ.
    "ga_kl_cache": {"method": {"name": "ga_kl"}, "reference": {"mode": "cache", "topk": 8}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_resume_equals_uninterrupted(toy_world, tmp_path, case):
    common = dict(train={"micro_batch_size": 2, "num_steps": NUM_STEPS, "lr": 2e-3, "warmup_ratio": 0.1},
                  checkpoint={"every_n_steps": 5}, data={"approximate": None, "general": None}, **CASES[case])
    if "reference" in common:
        common["reference"] = {**common["reference"], "cache_dir": str(tmp_path / "cache_full")}
    full = write_run_config(tmp_path / "full.json", toy_world, tmp_path / "full", **common)
    p = run_cli(["unlearn", "--config", str(full), "--zero", CPU_ZERO3], launcher=_launcher())
    assert p.returncode == 0, p.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    if "reference" in common:
        common["reference"] = {**common["reference"], "cache_dir": str(tmp_path / "cache_killed")}
    cfg = write_run_config(tmp_path / "killed.json", toy_world, killed_dir, **common)
    cmd = _launcher() + ["--module", "dsunlearn", "unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]
    proc = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = killed_dir / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, mid-run
    proc.wait()
    step_at_kill = json.loads(latest.read_text())["step"]
    assert 5 <= step_at_kill < NUM_STEPS
    assert not (killed_dir / "model").exists()
    if "reference" in common:
        assert any((tmp_path / "cache_killed").iterdir())
        shutil.rmtree(tmp_path / "cache_killed")

    # A resume on another world size is refused with the way out, and damages nothing: the right resume then lands.
    files = {f: f.stat().st_mtime_ns for f in killed_dir.rglob("*") if f.is_file()}
    p = run_cli(["unlearn", "--resume", str(killed_dir)])  # one rank
    assert p.returncode == 2, p.stderr[-2000:]
    msg = p.stderr.strip().splitlines()[-1]
    assert "written by 2 ranks, this run has 1" in msg and "zero_to_fp32.py" in msg
    assert {f: f.stat().st_mtime_ns for f in killed_dir.rglob("*") if f.is_file()} == files

    p = run_cli(["unlearn", "--resume", str(killed_dir)], launcher=_launcher())
    assert p.returncode == 0, p.stderr[-3000:]
    log = [json.loads(line) for line in (killed_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, NUM_STEPS + 1)), "each step logged exactly once"
    want, got = _weights(tmp_path / "full"), _weights(killed_dir)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), (k, (got[k] - want[k]).abs().max())
