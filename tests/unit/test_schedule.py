"""The learning-rate schedule (dsunlearn.schedule) against hand-computed values, and the engine using it."""
from __future__ import annotations

import json
import math
import os

import pytest

from dsunlearn.schedule import lr_factor, num_warmup_steps
from helpers import CPU_ZERO3, write_run_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def test_warmup_ramps_linearly_from_one_over_num_warmup():
    # 100 steps, 5% warm-up = 5 steps: 1/5, 2/5, ..., 5/5, then the schedule proper.
    assert num_warmup_steps(100, 0.05) == 5
    ramp = [lr_factor(s, 100, 0.05, "cosine", 0.0) for s in range(5)]
    assert ramp == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(5, 100, 0.05, "cosine", 0.0) == 1.0  # progress 0: the cosine starts at the full rate
    # Never a zero-LR first step, even when warmup_ratio * num_steps < 1.
    assert num_warmup_steps(10, 0.01) == 1 and lr_factor(0, 10, 0.01, "cosine", 0.0) == 1.0
    assert lr_factor(0, 1000, 0.5, "cosine", 0.0) == pytest.approx(1 / 500)


def test_warmup_count_is_not_rounded_up_by_float_error():
    # 0.07 * 100 == 7.000000000000001 in floating point: still 7 warm-up steps, the 7th at the full rate.
    assert num_warmup_steps(100, 0.07) == 7
    assert lr_factor(6, 100, 0.07, "constant", 0.0) == 1.0
    assert num_warmup_steps(101, 0.07) == 8  # 7.07: a partial step rounds up


def test_cosine_midpoint_end_and_floor():
    # 10 warm-up steps of 110: the cosine runs over steps 10..110, midpoint at step 60.
    args = (110, 10 / 110)
    assert num_warmup_steps(*args) == 10
    assert lr_factor(60, *args, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(35, *args, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(109, *args, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_factor(110, *args, "cosine", 0.0) == pytest.approx(0.0, abs=1e-15)
    # min_lr_ratio: the cosine decays to it (midpoint halfway between it and 1) and never goes below it.
    assert lr_factor(60, *args, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, *args, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, *args, "cosine", 0.1) == pytest.approx(0.1)  # held past the planned steps
    assert min(lr_factor(s, *args, "cosine", 0.1) for s in range(10, 200)) == pytest.approx(0.1)


def test_constant_schedule_and_no_warmup():
    assert [lr_factor(s, 8, 0.25, "constant", 0.1) for s in range(8)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])
    assert num_warmup_steps(8, 0.0) == 0
    assert [lr_factor(s, 8, 0.0, "constant", 0.0) for s in range(8)] == [1.0] * 8
    # warmup_ratio 0 with cosine: the first step is at the full rate, step 4 of 8 at the midpoint.
    assert lr_factor(0, 8, 0.0, "cosine", 0.0) == 1.0
    assert lr_factor(4, 8, 0.0, "cosine", 0.0) == pytest.approx(0.5)


def test_errors():
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 0.0, "linear", 0.0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        num_warmup_steps(10, 1.0)


def test_the_engine_steps_with_this_schedule(tmp_path, toy_world):
    """Each logged step's LR (the rate its update used) is train.lr * lr_factor(steps already taken)."""
    from dsunlearn.config import load_run_config
    from dsunlearn.loop import unlearn
    train = {"lr": 1e-3, "micro_batch_size": 2, "num_steps": 5, "schedule": "cosine", "warmup_ratio": 0.4,
             "min_lr_ratio": 0.2}
    path = write_run_config(tmp_path / "cfg.json", toy_world, tmp_path / "run", train=train, method={"name": "ga"},
                            data={"approximate": None, "general": None}, output={"save_model": False})
    assert unlearn(load_run_config(str(path)), CPU_ZERO3) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    expected = [1e-3 * lr_factor(r["step"] - 1, 5, 0.4, "cosine", 0.2) for r in log]
    assert [r["lr"] for r in log] == pytest.approx(expected, rel=1e-6)
    # 2 warm-up steps, then the cosine over steps 2..5: progress 0, 1/3, 2/3 (cos = 1, 1/2, -1/2).
    assert expected == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3 * (0.2 + 0.8 * 0.75), 1e-3 * (0.2 + 0.8 * 0.25)])
