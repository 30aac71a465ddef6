"""Methods in phases under real ZeRO-3 on 2 CPU ranks: 2 ranks give the 1-rank weights through every phase kind (edit,
train, task arithmetic, distillation from a teacher boundary), and a run SIGKILLed in phase 2 resumes to the
uninterrupted run's weights.

Four launches: both methods on 2 ranks in one launch (``multi_unlearn.py``), both on 1 rank in one process, the killed
run, its resume.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import CPU_ZERO3, REPO, deepspeed_launcher, direction_cosine, launch_env, run_cli, write_run_config

NEGATE = {"name": "negate_repair", "params": {"token_threshold": 2.0, "fit_steps": 12,
                                              "fit_batch": 4, "fit_lr": 1e-3, "keep_off_negation": True}}
UNDO = {"name": "undo", "params": {"unlearn_method": "ga_gd", "unlearn_steps": 3, "unlearn_batch": 4, "alpha": 0.3}}
FIT_STEPS = NEGATE["params"]["fit_steps"]


def _config(root: Path, toy_world, name: str, method: dict, ranks: int) -> str:
    # The same global batch in every phase: the earlier phases' batches are global; the last phase's micro-batch
    # is per rank (4 chunks = 1 x 4 = 2 x 2).
    return str(write_run_config(root / f"{name}.json", toy_world, root / name, method=method,
                                train={"micro_batch_size": 4 // ranks, "num_steps": 3, "lr": 1e-3},
                                checkpoint={"every_n_steps": 2}, eval={"splits": []},
                                data={"approximate": None, "general": None}))


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("phases_dist")
    multi = str(REPO / "tests" / "dist" / "multi_unlearn.py")
    for ranks in (2, 1):
        configs = [_config(root, toy_world, f"{name}{ranks}", method, ranks)
                   for name, method in (("negate", NEGATE), ("undo", UNDO))]
        cmd = (deepspeed_launcher(2) if ranks == 2 else [sys.executable]) + [multi, "--zero", CPU_ZERO3, *configs]
        p = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return root


@pytest.mark.parametrize("name", ["negate", "undo"])
def test_two_ranks_equal_one_rank_through_every_phase(runs, name):
    one, two = runs / f"{name}1", runs / f"{name}2"
    phases = sorted(d.name for d in (two / "phases").iterdir())
    assert phases == sorted(d.name for d in (one / "phases").iterdir()) and phases
    for d in [f"phases/{p}" for p in phases] + ["."]:
        a, b = _weights(one / d), _weights(two / d)
        assert set(a) == set(b)
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=2e-5), (d, key, (a[key] - b[key]).abs().max())
    for p in phases:
        record = json.loads((two / "phases" / p / "phase.json").read_text())
        assert record["world_size"] == 2 and record["boundary_bytes"] > 0
    if name == "negate":  # the repair was kept off the negation on each rank's partitions (keep_off.py)
        rows, negated, out = (_weights(two / d) for d in ("phases/1-rows", "phases/3-negate", "."))
        assert any(not torch.equal(out[k], negated[k]) for k in out)  # the repair moved the weights
        assert abs(direction_cosine(out, negated, rows)) < 1e-5
    if name == "undo":  # the distillation read the teacher boundary through a frozen ZeRO-3 engine
        assert json.loads((two / "reference.json").read_text())["reference"]["mode"] == "engine"


def _fit_checkpoint(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "phases" / "2-fit" / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def test_sigkill_in_phase_2_then_resume_equals_uninterrupted(runs, toy_world):
    killed = runs / "killed"
    cfg = _config(runs, toy_world, "killed", NEGATE, 2)
    cmd = deepspeed_launcher(2) + ["--module", "dsunlearn", "unlearn", "--config", cfg, "--zero", CPU_ZERO3]
    proc = subprocess.Popen(cmd, env=launch_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _fit_checkpoint(killed) < 2:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, inside phase 2 (the fine-tune on the forget set)
    proc.wait()
    assert 2 <= _fit_checkpoint(killed) < FIT_STEPS
    assert (killed / "phases" / "1-rows" / "phase.json").is_file()
    assert not (killed / "phases" / "2-fit" / "phase.json").exists() and not (killed / "model").exists()
    rows_written = (killed / "phases" / "1-rows" / "phase.json").stat().st_mtime_ns

    p = run_cli(["unlearn", "--resume", str(killed)], launcher=deepspeed_launcher(2))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (killed / "phases" / "1-rows" / "phase.json").stat().st_mtime_ns == rows_written  # not run again
    fit_log = [json.loads(x) for x in (killed / "phases" / "2-fit" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in fit_log] == list(range(1, FIT_STEPS + 1)), "each step of phase 2 logged once"
    want, got = _weights(runs / "negate2"), _weights(killed)
    assert set(want) == set(got)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), (key, (got[key] - want[key]).abs().max())
