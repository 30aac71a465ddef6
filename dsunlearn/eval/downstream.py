"""Downstream utility through lm-evaluation-harness (``pip install dsunlearn[lm_eval]``).

    dsunlearn lm-eval --model runs/x/model --tasks hellaswag,arc_easy --out runs/x/lm_eval [--limit 100]
    dsunlearn lm-eval ... --include-path my_tasks/   # your own task YAMLs (e.g. over local JSON files: offline)

dsunlearn builds and runs the ``lm_eval`` command line on the saved Hugging Face model (safetensors, no remote code
unless the run allowed it). Task data comes from wherever the task says: the hub's datasets need network access;
tasks defined over local files run offline.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..config import ConfigError


def lm_eval_command(model_dir: str, tasks: Sequence[str], out_dir: str, *, device: str = "cpu",
                    batch_size: int = 8, limit: Optional[int] = None, include_path: Optional[str] = None,
                    dtype: str = "float32", trust_remote_code: bool = False, num_fewshot: Optional[int] = None,
                    executable: Optional[str] = None) -> list[str]:
    """The ``lm_eval`` invocation for a saved model directory."""
    if not tasks:
        raise ConfigError("lm-eval: name at least one task (--tasks a,b)")
    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"lm-eval --model: {model_dir} is not a Hugging Face model directory (no config.json)")
    model_args = f"pretrained={Path(model_dir).resolve()},dtype={dtype}"
    if trust_remote_code:
        model_args += ",trust_remote_code=True"
    cmd = [executable or shutil.which("lm_eval") or "lm_eval", "--model", "hf", "--model_args", model_args,
           "--tasks", ",".join(tasks), "--device", device, "--batch_size", str(batch_size),
           "--output_path", str(Path(out_dir).resolve())]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if include_path:
        cmd += ["--include_path", str(Path(include_path).resolve())]
    if num_fewshot is not None:
        cmd += ["--num_fewshot", str(num_fewshot)]
    return cmd


def run_lm_eval(cmd: list[str]) -> int:
    if shutil.which(cmd[0]) is None:
        raise ConfigError("lm-eval: the lm_eval command is not installed (pip install 'dsunlearn[lm_eval]')")
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)
