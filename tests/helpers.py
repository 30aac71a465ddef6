"""Helpers for tests that launch real CPU ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_ZERO3 = str(REPO / "ds_configs" / "zero3_cpu_test.json")


def launch_env() -> dict:
    """Environment for subprocess launches: CPU accelerator over gloo on loopback, one thread per rank."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    # The launchers (deepspeed, mpirun.sh's python) must come from this interpreter's environment even when it
    # was not activated (make and CI call .venv/bin/python directly).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    from dsunlearn.engine import LAUNCHER_ENV
    for key in LAUNCHER_ENV:
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], launcher: list[str] | None = None, timeout: int = 300, cwd=None):
    """Run ``python -m dsunlearn ARGS``, or ``LAUNCHER --module dsunlearn ARGS`` (deepspeed's spelling of -m)."""
    cmd = (launcher + ["--module", "dsunlearn"] if launcher else [sys.executable, "-m", "dsunlearn"]) + args
    return subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO)


def write_run_config(path: Path, world: dict, run_dir: Path, **sections) -> Path:
    cfg = {
        "model": {"path": world["model"]},
        "data": {"forget": world["forget"], "retain": world["retain"], "approximate": world["approximate"],
                 "general": world["general"], "seq_len": 64},
        "method": {"name": "ga_gd"},
        "train": {"lr": 1e-3, "micro_batch_size": 2, "num_steps": 5, "warmup_ratio": 0.0},
        "output": {"run_dir": str(run_dir)},
        # Generation (greedy decoding by three models at the end) is off unless a test asks for it: it is checked
        # on the 2-rank runs of tests/dist/test_engine_dist.py, by tests/unit/test_generate.py and test_muse.py.
        "eval": {"generation_prompts": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(json.dumps(cfg, indent=1))
    return path




def deepspeed_launcher(num_gpus: int = 2) -> list[str]:
    """The deepspeed launcher of this interpreter's environment, on a free port."""
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(num_gpus),
            "--master_port", str(free_port())]


def direction_cosine(theta: dict, origin: dict, toward: dict) -> float:
    """cos(theta - origin, toward - origin) over the whole weight space (state dicts of the same model)."""
    import torch
    d = torch.cat([(theta[k] - origin[k]).double().flatten() for k in theta])
    u = torch.cat([(toward[k] - origin[k]).double().flatten() for k in theta])
    return float(d @ u / (d.norm() * u.norm()))
