"""The CLI end to end without a process group: --dry-run on every shipped ZeRO config, and one-line errors."""
import json
from pathlib import Path

import pytest

from dsunlearn.cli import main
from helpers import REPO, write_run_config

SHIPPED_ZERO = sorted(str(p) for p in (REPO / "ds_configs").glob("*.json"))


def test_ships_the_expected_zero_configs():
    names = {Path(p).name for p in SHIPPED_ZERO}
    assert {"zero3.json", "zero3_offload.json", "zero2.json", "zero3_cpu_test.json"} <= names


@pytest.mark.parametrize("zero", SHIPPED_ZERO, ids=lambda p: Path(p).name)
def test_dry_run_resolves_every_shipped_zero_config(zero, toy_world, tmp_path, capsys):
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run")
    assert main(["unlearn", "--config", str(cfg), "--zero", zero, "--dry-run", "--world-size", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["zero_config"]["train_batch_size"] == 2 * 1 * 8
    assert out["run_config"]["method"]["name"] == "ga_gd"
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_cpu_test_config_really_partitions_tiny_models():
    cfg = json.loads((REPO / "ds_configs" / "zero3_cpu_test.json").read_text())
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert cfg["bf16"]["enabled"] is False


@pytest.mark.parametrize("override, fragment", [
    (["--set", "train.lr=-1"], "train.lr: expected > 0"),
    (["--set", "method.name=nope"], "unknown method 'nope'"),
    (["--set", "data.forget=/nonexistent.jsonl"], "/nonexistent.jsonl: data file or folder not found"),
    (["--set", "model.path=/nonexistent"], "model.path: /nonexistent is not a directory"),
    (["--set", "data.seq_len=100000"], "data.seq_len=100000 exceeds the model's maximum"),
])
def test_bad_input_is_one_line_and_exit_2(override, fragment, toy_world, tmp_path, capsys):
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run")
    code = main(["unlearn", "--config", str(cfg), "--zero", SHIPPED_ZERO[0], "--dry-run"] + override)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("dsunlearn: error: ") and fragment in err[-1], err


def test_zero_conflict_exits_2(toy_world, tmp_path, capsys):
    zero = tmp_path / "z.json"
    zero.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 3}}))
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run")
    assert main(["unlearn", "--config", str(cfg), "--zero", str(zero), "--dry-run"]) == 2
    assert "train_micro_batch_size_per_gpu=16 conflicts with the run config" in capsys.readouterr().err


def test_methods_lists_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ga " in out and "ga_gd" in out


def test_help_config_documents_every_field(capsys):
    assert main(["unlearn", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 2e-05  -- Peak learning rate" in out
    assert all("--" in line and line.split("--", 1)[1].strip() for line in out.strip().splitlines())
