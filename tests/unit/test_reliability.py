"""Divergence guard and bad input (issue: never lose a run). In-process runs on one CPU rank (gloo)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from dsunlearn.cli import main
from dsunlearn.config import load_run_config
from dsunlearn.methods.terms import token_nll
from helpers import CPU_ZERO3, write_run_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@dataclass(frozen=True, kw_only=True)
class NaNOnThirdStep:
    """Gradient ascent whose 3rd loss is NaN: a stand-in for the divergence GA reaches by itself."""
    streams: ClassVar = ("forget",)
    term_names: ClassVar = ("forget",)
    reference: ClassVar = {}
    needs_hidden_states: ClassVar = False
    citation: ClassVar = "test"
    calls: list = field(default_factory=list)

    def terms(self, outputs):
        self.calls.append(1)
        loss = -token_nll(outputs["forget"].logits, outputs["forget"].labels)
        return {"forget": loss * float("nan") if len(self.calls) == 3 else loss}


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def _unlearn(cfg_path, tmp_path, method=None, overrides=()):
    from dsunlearn.loop import unlearn
    cfg = load_run_config(str(cfg_path), list(overrides))
    return unlearn(cfg, CPU_ZERO3, method=method)


def test_nonfinite_loss_stops_cleanly_with_last_good_weights(toy_world, tmp_path):
    common = dict(train={"lr": 1e-2, "micro_batch_size": 2, "num_steps": 5, "schedule": "constant",
                         "warmup_ratio": 0.0}, method={"name": "ga"}, data={"approximate": None, "general": None})
    cfg = write_run_config(tmp_path / "nan.json", toy_world, tmp_path / "nan", **common)
    code = _unlearn(cfg, tmp_path, method=NaNOnThirdStep())
    assert code == 3
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["steps"] == 2 and "non-finite loss at step 3" in summary["stop_reason"]
    log = [json.loads(line) for line in (tmp_path / "nan" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    # The exported weights are those after step 2: equal to a clean 2-step run of the same method.
    ref = write_run_config(tmp_path / "two.json", toy_world, tmp_path / "two",
                           **{**common, "train": {**common["train"], "num_steps": 2}})
    assert _unlearn(ref, tmp_path) == 0
    got, want = _weights(tmp_path / "nan" / "model"), _weights(tmp_path / "two" / "model")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
        assert torch.isfinite(got[k]).all()


def test_forget_loss_ceiling_stops_before_the_update(toy_world, tmp_path):
    cfg = write_run_config(tmp_path / "c.json", toy_world, tmp_path / "c", method={"name": "ga"},
                           train={"lr": 5e-2, "num_steps": 30, "schedule": "constant", "warmup_ratio": 0.0},
                           guard={"forget_loss_ceiling": 6.5}, data={"approximate": None, "general": None})
    assert _unlearn(cfg, tmp_path) == 3
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert "above guard.forget_loss_ceiling=6.5" in summary["stop_reason"]
    assert (tmp_path / "c" / "model" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert all(r["nll/forget"] <= 6.5 for r in log)  # every logged step ran below the ceiling


# --------------------------------------------------------------------------------------------------- bad input

def _snapshot(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def guarded(toy_world, tmp_path):
    """A run config and a non-empty run directory whose files must survive every failed launch untouched."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("earlier results")
    cfg = write_run_config(tmp_path / "run.json", toy_world, run_dir)
    before = _snapshot(tmp_path)

    def check(args, fragment, capsys):
        code = main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert err and err[-1].startswith("dsunlearn: error: ") and fragment in err[-1], err
        after = {k: v for k, v in _snapshot(tmp_path).items() if k in before}
        assert after == before, "a failed launch modified an existing file"
    return check, tmp_path


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_non_empty_run_dir_is_refused(guarded, capsys):
    check, _ = guarded
    check([], "is not empty; pass --overwrite", capsys)


def test_missing_model_files(guarded, capsys, tmp_path):
    check, _ = guarded
    empty = tmp_path / "empty_model"
    empty.mkdir()
    check(["--set", f"model.path={empty}", "--set", f"output.run_dir={tmp_path / 'new'}"],
          f"model.path: {empty} has no config.json", capsys)


def test_pickle_weights_are_not_loaded_by_default(guarded, capsys, tmp_path, toy_world):
    import shutil
    check, _ = guarded
    model = tmp_path / "bin_model"
    shutil.copytree(toy_world["model"], model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    check(["--set", f"model.path={model}", "--set", f"output.run_dir={tmp_path / 'new'}"],
          "has no .safetensors weights (found pytorch_model.bin: pickle files run code", capsys)


def test_tokenizer_model_vocab_mismatch(guarded, capsys, tmp_path, toy_world):
    import shutil
    check, _ = guarded
    model = tmp_path / "small_vocab"
    shutil.copytree(toy_world["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 100
    (model / "config.json").write_text(json.dumps(config))
    check(["--set", f"model.path={model}", "--set", f"output.run_dir={tmp_path / 'new'}"],
          "tokens but the model's vocab_size is 100", capsys)


def test_seq_len_beyond_model_maximum(guarded, capsys, tmp_path):
    check, _ = guarded
    check(["--set", "data.seq_len=4096", "--set", f"output.run_dir={tmp_path / 'new'}"],
          "data.seq_len=4096 exceeds the model's maximum of 128 positions", capsys)


def test_zero_json_invalid(guarded, capsys, tmp_path):
    check, _ = guarded
    bad = _write(tmp_path / "bad_zero.json", b'{"zero_optimization": {"stage": 3,}}')
    check(["--zero", bad], f"{bad}: not valid JSON", capsys)


def test_zero_json_conflict(guarded, capsys, tmp_path):
    check, _ = guarded
    bad = _write(tmp_path / "conflict.json", json.dumps({"gradient_accumulation_steps": 8,
                                                          "zero_optimization": {"stage": 3}}).encode())
    check(["--zero", bad], "gradient_accumulation_steps=8 conflicts with the run config (train.grad_accum gives 1)",
          capsys)


def test_global_batch_mismatch(guarded, capsys):
    check, _ = guarded
    check(["--set", "train.global_batch_size=64"],
          "train.global_batch_size=64 but train.micro_batch_size (2) x train.grad_accum (1) x world size (1) = 2",
          capsys)


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty file"),
    (b'{"text": "fine"}\n{"text": "broken"\n', "bad.jsonl:2: malformed JSON"),
    (b'{"text": "fine"}\n{"body": "no text"}\n', "bad.jsonl:2: missing text field 'text'"),
    (b'{"text": "caf\xe9"}\n', "bad.jsonl:1: not UTF-8"),
    (b'{"text": "a"}\n{"text": "b"}\n', "zero usable chunks"),
])
def test_bad_data_files(guarded, capsys, tmp_path, content, fragment):
    check, _ = guarded
    bad = _write(tmp_path / "bad.jsonl", content)
    check(["--set", f"data.forget={bad}", "--set", f"output.run_dir={tmp_path / 'new'}"], fragment, capsys)
    assert not (tmp_path / "new").exists(), "nothing is created before the input is validated"
