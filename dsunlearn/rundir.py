"""A run directory and what lives in it: the guard against mixing runs, the step log (log.jsonl + TensorBoard),
the run state, and checkpoints that a killed run resumes from.

    RUN_DIR/config.json ds_config.json   resolved configs (written before step 1)
    RUN_DIR/log.jsonl tb/                one line / scalar set per optimizer step (rank 0)
    RUN_DIR/checkpoints/latest.json      the last COMPLETE checkpoint (written after every rank finished)
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import engine as E
from .config import ConfigError, to_dict
from .data import write_json_atomic, write_text_atomic
from .zero import load_zero_json


@dataclass
class RunState:
    step: int = 0
    stop_reason: Optional[str] = None
    tokens: int = 0         # real (non-pad) tokens trained on in this process
    seconds: float = 0.0    # wall time of those optimizer steps
    skipped_steps: int = 0  # optimizer steps DeepSpeed discarded (non-finite gradient or fp16 overflow)
    consecutive_skips: int = 0


def prepare_run_dir(run_dir: str, overwrite: bool, resume: bool) -> None:
    """Refuse to mix two runs in one directory (rank 0 only)."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output.run_dir: {run_dir} exists and is not a directory")
    if resume:
        # A phased run killed before its last phase's first checkpoint resumes from its completed phases.
        if not (path / "checkpoints" / "latest.json").is_file() and not (path / "phases").is_dir():
            raise ConfigError(f"--resume {run_dir}: no complete checkpoint there (checkpoints/latest.json missing)")
        return
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"output.run_dir: {run_dir} is not empty; pass --overwrite to replace it or "
                              f"--resume {run_dir} to continue it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def claim_run_dir(run_dir: str, overwrite: bool, resume: bool) -> None:
    """Rank 0 checks (and prepares) the run directory; every rank learns the verdict, so a refusal exits everywhere
    with code 2. A resume on another number of ranks is refused here, before anything in the directory is
    rewritten."""
    error = None
    if E.is_main():
        try:
            prepare_run_dir(run_dir, overwrite, resume)
            if resume:
                check_resume_world_size(run_dir)
        except ConfigError as e:
            error = str(e)
    error = E.broadcast_object(error)
    if error:
        raise ConfigError(error)


def write_run_files(p, zero_path: str, resume: bool) -> None:
    """The resolved configs and data statistics of a prepared run (``prepare.Prepared``), before step 1 (rank 0)."""
    if not E.is_main():
        return
    run_dir = Path(p.cfg.output.run_dir)
    write_json_atomic(run_dir / "config.json", to_dict(p.cfg))
    write_json_atomic(run_dir / "ds_config.json", p.ds_config)
    if not resume:  # the ZeRO JSON as the user wrote it: --resume re-resolves it for its own world size
        write_json_atomic(run_dir / "ds_config.user.json", load_zero_json(zero_path))
    write_json_atomic(run_dir / "data_stats.json",
                      {n: {"source": s.source, **s.stats.__dict__} for n, s in p.streams.items()})


class RunLogger:
    """log.jsonl + TensorBoard scalars + tqdm, on rank 0 only."""

    def __init__(self, run_dir: str, num_steps: int, start_step: int, enabled: bool, desc: str = "unlearn",
                 phase: Optional[str] = None):
        self.enabled = enabled
        self.phase = phase
        """A phased method's phase: every log.jsonl line carries it, and the TensorBoard run is named by it."""
        self.writer = self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        self.path = Path(run_dir) / "log.jsonl"
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=num_steps, initial=start_step, desc=f"{desc} ({phase})" if phase else desc,
                        dynamic_ncols=True)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        # NaN/inf (a skipped step's loss and norm) become null: log.jsonl stays strict JSON.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if self.phase:
            record["phase"] = self.phase
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])
        self.bar.update(1)
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in record.items()
                             if k.startswith("loss/") and v is not None})

    def scalars(self, step: int, values: dict) -> None:
        if self.enabled:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.flush()
            self.writer.close()
            self.bar.close()


def save_checkpoint(engine, run_dir: str, step: int, keep_last: int) -> None:
    """DeepSpeed checkpoint + our own ``latest.json``, written only after every rank finished writing.

    DeepSpeed's own ``latest`` file is not used: ours is replaced atomically after a barrier, so a crash during a
    save leaves the previous complete checkpoint as the one a resume loads.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    E.barrier()
    if E.is_main():
        write_json_atomic(ckpt_dir / "latest.json", {"tag": tag, "step": step, "world_size": E.world_size()})
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    E.barrier()


def has_checkpoint(run_dir: str) -> bool:
    return (Path(run_dir) / "checkpoints" / "latest.json").is_file()


def check_world_size(ckpt_dir: Path, run_dir: str) -> dict:
    """``ckpt_dir``'s ``latest.json``, or a ConfigError when it was written by another number of ranks."""
    latest = json.loads((ckpt_dir / "latest.json").read_text())
    if latest["world_size"] != E.world_size():
        raise ConfigError(
            f"--resume {run_dir}: checkpoint {latest['tag']} was written by {latest['world_size']} ranks, this run has "
            f"{E.world_size()}. ZeRO checkpoints are tied to the world size: resume with {latest['world_size']} ranks, "
            f"or consolidate with `python {ckpt_dir}/zero_to_fp32.py {ckpt_dir} OUT --tag {latest['tag']} "
            f"--safe_serialization` and start a new run from OUT")
    return latest


def check_resume_world_size(run_dir: str) -> None:
    """--resume, before anything in the run dir is rewritten: every checkpoint of the run (its own and its phases')
    was written by this many ranks, else the ConfigError that says how to convert."""
    for latest in sorted(Path(run_dir).glob("**/checkpoints/latest.json")):
        check_world_size(latest.parent, run_dir)


def load_latest_checkpoint(engine, run_dir: str) -> int:
    ckpt_dir = Path(run_dir) / "checkpoints"
    latest = check_world_size(ckpt_dir, run_dir)
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=latest["tag"])
    return int(client["step"])


def resume_from_checkpoint(engine, run_dir: str, state: RunState) -> None:
    """--resume: the last complete checkpoint's weights and step, the log cut back to it, the skip counters."""
    state.step = load_latest_checkpoint(engine, run_dir)
    if E.is_main():
        truncate_log(Path(run_dir) / "log.jsonl", state.step)
    restore_skip_counters(Path(run_dir) / "log.jsonl", state)


def truncate_log(path: Path, step: int) -> None:
    """On resume: drop log lines of steps after the checkpoint (they are run again)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in keep))


def restore_skip_counters(path: Path, state: RunState) -> None:
    """On resume: the skipped-step counters logged at the checkpoint's step, read on rank 0 and broadcast (the stop
    decision they feed must be the same on every rank)."""
    counters = (0, 0)
    if E.is_main() and path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["step"] == state.step:
                counters = (int(record.get("skipped_steps", 0)), int(record.get("consecutive_skips", 0)))
    state.skipped_steps, state.consecutive_skips = E.broadcast_object(counters)


def restore_last_good(engine, run_dir: str, state: RunState) -> bool:
    """After an update that was *applied* with a non-finite gradient (an engine without DeepSpeed's overflow check):
    reload the last checkpoint. False when there is none."""
    if not (Path(run_dir) / "checkpoints" / "latest.json").is_file():
        state.stop_reason += "; no checkpoint to fall back to, so no model is exported"
        return False
    state.step = load_latest_checkpoint(engine, run_dir)
    state.stop_reason += f"; weights restored from the checkpoint of step {state.step}"
    return True


