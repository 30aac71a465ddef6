"""The learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio`` or a constant rate.

Pure functions of the step (no deepspeed, no optimizer): ``engine.build_train_engine`` wraps :func:`lr_factor` in a
``torch.optim.lr_scheduler.LambdaLR``, which multiplies ``train.lr`` by it. The cosine is the one of Loshchilov &
Hutter, "SGDR", ICLR 2017 (arXiv:1608.03983), eq. 5, without restarts, and of transformers'
``get_cosine_schedule_with_warmup``: ``progress = (step - num_warmup) / (num_steps - num_warmup)``.
"""
from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_factor", "num_warmup_steps"]

SCHEDULES = ("cosine", "constant")


def num_warmup_steps(num_steps: int, warmup_ratio: float) -> int:
    """``ceil(warmup_ratio * num_steps)``, at least 1 when ``warmup_ratio > 0``; 0 when it is 0."""
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if warmup_ratio == 0:
        return 0
    # 0.07 * 100 is 7.000000000000001 in binary floating point: round before the ceiling, or 7% of 100 steps is 8.
    return max(1, math.ceil(round(warmup_ratio * num_steps, 9)))


def lr_factor(step: int, num_steps: int, warmup_ratio: float, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate for the optimizer step that follows ``step`` steps already taken.

    Warm-up: ``(step + 1) / num_warmup`` for ``step < num_warmup`` (the first step gets ``1 / num_warmup``, never 0: a
    zero-LR step would spend a forward and backward on nothing). Then ``"constant"``: 1; ``"cosine"``:
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2`` with progress 0 at the end of warm-up and 1 at
    ``step == num_steps`` (held at ``min_lr_ratio`` beyond).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    num_warmup = num_warmup_steps(num_steps, warmup_ratio)
    if step < num_warmup:
        return (step + 1) / num_warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - num_warmup) / max(1, num_steps - num_warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
