"""The GPU benchmark must be ready to run when a GPU session gets its few minutes: its whole code path, on a tiny
model on the CPU (numbers meaningless, the table's shape checked)."""
from __future__ import annotations

import subprocess
import sys

from helpers import REPO, launch_env


def test_bench_gpu_step_runs_its_code_path_on_a_tiny_model():
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu_step.py"), "--tiny", "--steps", "1",
                        "--warmup", "1", "--modes", "torch,deepspeed_zero3,zero3_ga_gd,zero3_ga_kl_engine"],
                       env=launch_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| plain PyTorch (fp32 master, bf16 autocast, fused AdamW)", "| plain DeepSpeed ZeRO-3 (ds_configs/zero3.json)",
        "| dsunlearn ZeRO-3 ga_gd", "| dsunlearn ZeRO-3 ga_kl (reference engine)"]
    for row in rows:
        seconds = float(row.split(" | ")[1])
        assert seconds > 0


def test_bench_lora_runs_its_code_path_on_a_tiny_model(tmp_path):
    """LoRA vs full fine-tuning: both launches of one method, the table and the ratio line."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_lora.py"), "--ranks", "1", "--methods", "npo",
                        "--hidden", "64", "--layers", "1", "--vocab", "512", "--seq-len", "64", "--steps", "2",
                        "--rank", "4", "--work-dir", str(tmp_path)],
                       env=launch_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in p.stdout.splitlines()
            if line.startswith("| npo |")]
    assert [r[1] for r in rows] == ["full, reference engine", "LoRA r=4, adapters off"]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)  # peak RSS (MiB), step (s)
    assert "npo: LoRA / full peak memory" in p.stdout


def test_bench_memory_plan_runs_its_code_path_on_a_tiny_model(tmp_path):
    """A measured run and the --dry-run plan of the same config, one table row with every phase."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_memory_plan.py"), "--sizes", "64x1",
                        "--modes", "cache", "--vocab", "512", "--seq-len", "64", "--steps", "2",
                        "--work-dir", str(tmp_path)],
                       env=launch_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in p.stdout.splitlines()
            if line.startswith("| ") and "(64x1)" in line]
    assert len(rows) == 1 and rows[0][1] == "cache"
    for cell in rows[0][2:7]:  # four phases and the peak: "plan / measured" in MiB
        plan, measured = (float(v) for v in cell.split(" / "))
        assert plan > 0 and measured > 0
    assert float(rows[0][7]) > 0
