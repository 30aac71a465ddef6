"""Divergence guard and bad input (issue: never lose a run). In-process runs on one CPU rank (gloo)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from dsunlearn.cli import main
from dsunlearn.config import ConfigError, load_run_config
from dsunlearn.methods.base import Method
from dsunlearn.methods.terms import token_nll
from helpers import CPU_ZERO3, write_run_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@dataclass(frozen=True, kw_only=True)
class NaNOnCalls(Method):
    """Gradient ascent whose loss is NaN on the given calls (1-based): a stand-in for one bad micro-batch (or the
    divergence GA reaches by itself, when every call from some point on is NaN)."""
    nan_from: int = 3
    nan_until: int = 3
    calls: list = field(default_factory=list)

    def terms(self, outputs):
        self.calls.append(1)
        loss = -token_nll(outputs["forget"].logits, outputs["forget"].labels)
        return {"forget": loss * float("nan") if self.nan_from <= len(self.calls) <= self.nan_until else loss}


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def _unlearn(cfg_path, tmp_path, method=None, overrides=()):
    from dsunlearn.loop import unlearn
    cfg = load_run_config(str(cfg_path), list(overrides))
    return unlearn(cfg, CPU_ZERO3, method=method)


_GA = dict(train={"lr": 1e-2, "micro_batch_size": 2, "num_steps": 5, "schedule": "constant", "warmup_ratio": 0.0},
           method={"name": "ga"}, data={"approximate": None, "general": None})


def _ga_run(tmp_path, toy_world, name, num_steps, method=None, **sections):
    cfg = write_run_config(tmp_path / f"{name}.json", toy_world, tmp_path / name,
                           **{**_GA, "train": {**_GA["train"], "num_steps": num_steps}, **sections})
    code = _unlearn(cfg, tmp_path, method=method)
    log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return code, log, json.loads((tmp_path / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def clean_two_steps(toy_world, tmp_path_factory):
    """The weights of a clean 2-step GA run: what a run whose 3rd step is skipped must hold after it."""
    tmp = tmp_path_factory.mktemp("clean")
    assert _ga_run(tmp, toy_world, "two", 2)[0] == 0
    return _weights(tmp / "two" / "model")


def _assert_equal_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
        assert torch.isfinite(got[k]).all()


def test_one_nonfinite_gradient_skips_that_step_and_the_run_goes_on(toy_world, tmp_path, clean_two_steps):
    # Step 3's gradient is NaN: DeepSpeed discards that update, the weights stay those of step 2.
    code, log, summary = _ga_run(tmp_path, toy_world, "skip3", 3, method=NaNOnCalls())
    assert code == 0 and summary["skipped_steps"] == 1 and summary["stop_reason"] is None
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in log] == [(1, 0, 0), (2, 0, 0), (3, 1, 1)]
    assert log[2]["loss/forget"] is None and log[2]["grad_norm"] is None  # NaN/inf logged as null (strict JSON)
    _assert_equal_weights(_weights(tmp_path / "skip3" / "model"), clean_two_steps)
    # ... and the steps after it are applied again.
    code, log, summary = _ga_run(tmp_path, toy_world, "skip3of5", 5, method=NaNOnCalls())
    assert code == 0 and [r["skipped"] for r in log] == [0, 0, 1, 0, 0] and summary["skipped_steps"] == 1
    assert log[4]["nll/forget"] > log[3]["nll/forget"] > log[1]["nll/forget"]
    got = _weights(tmp_path / "skip3of5" / "model")
    assert any(not torch.equal(got[k], clean_two_steps[k]) for k in got)


def test_consecutive_skips_stop_cleanly_with_the_last_good_weights(toy_world, tmp_path, clean_two_steps):
    code, log, summary = _ga_run(tmp_path, toy_world, "diverged", 8, method=NaNOnCalls(nan_until=10 ** 6),
                                 guard={"max_consecutive_skips": 2})
    assert code == 3
    assert "2 consecutive optimizer steps skipped" in summary["stop_reason"]
    assert "weights are those after step 2" in summary["stop_reason"]
    assert [(r["step"], r["skipped"]) for r in log] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    _assert_equal_weights(_weights(tmp_path / "diverged" / "model"), clean_two_steps)


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


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("override, fragment", [
    ("cost.known_model=yi-6", "cost.known_model: unknown 'yi-6'; known: "),
    # RMU's layer is checked against the model's config.json before any weights load (the toy model has 2 layers).
    ("method.params={\"layer\": 5}", "method.params.layer=5: the model has 2 decoder layers"),
])
def test_config_mistakes_found_before_anything_runs(guarded, capsys, dry_run, override, fragment):
    check, _ = guarded
    args = ["--set", override] + (["--set", "method.name=rmu"] if "layer" in override else [])
    check(args + (["--dry-run"] if dry_run else []), fragment, capsys)


def test_a_failure_after_training_keeps_the_model_and_the_results(toy_world, tmp_path, monkeypatch):
    """Cost and report come after the work: when they fail, the model, summary.json and metrics.json are written
    first and the error is raised last."""
    from dsunlearn import loop
    from dsunlearn.eval import report

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the report")

    def broken_cost(*args, **kwargs):
        raise ConfigError("cost: boom")

    monkeypatch.setattr(report, "write_report", broken)
    monkeypatch.setattr(loop, "plan_cost", broken_cost)
    cfg = write_run_config(tmp_path / "late.json", toy_world, tmp_path / "late", method={"name": "ga_gd"},
                           train={"num_steps": 2, "micro_batch_size": 2})
    with pytest.raises(ConfigError, match="cost: boom"):
        _unlearn(cfg, tmp_path)
    run = tmp_path / "late"
    assert (run / "model" / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["cost"] is None
    assert summary["errors"] == ["ConfigError: cost: boom", "RuntimeError: boom in the report"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "after" in metrics and "cost" not in metrics
    assert not (run / "report.md").exists()


def test_the_stop_rule_exports_the_weights_of_the_best_evaluated_step(toy_world, tmp_path, monkeypatch):
    """model/ holds the weights of the step the evaluator judged best, exported when it was evaluated: equal to a
    plain run of that many steps. The toy model is untrained (every split ~6.15 nats: "cannot judge"), so the
    judgement is scripted to prefer step 3 and the crossing is held off; the export path is the real one."""
    from dsunlearn.eval import runner
    monkeypatch.setattr(runner.Evaluator, "judge",
                        lambda self, result, *part, **how: {"ok": False, "status": "scripted", "reasons": [], "figures": {},
                                              "distance": abs(len(self.history) - 3)})
    monkeypatch.setattr(runner, "stop_rule_holds", lambda result, cfg: False)
    sections = dict(method={"name": "ga_gd"}, data={"general": None},
                    train={"lr": 5e-3, "micro_batch_size": 2, "num_steps": 6, "schedule": "constant",
                           "warmup_ratio": 0.0},
                    eval={"max_chunks": 8, "micro_batch_size": 4, "split_check": False})
    cfg = write_run_config(tmp_path / "rule.json", toy_world, tmp_path / "rule", **{
        **sections, "eval": {**sections["eval"], "every_n_steps": 1, "stop_tolerance": 0.05}})
    assert _unlearn(cfg, tmp_path) == 0
    metrics = json.loads((tmp_path / "rule" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["exported_step"] == 3
    plain = write_run_config(tmp_path / "plain.json", toy_world, tmp_path / "plain", **{
        **sections, "train": {**sections["train"], "num_steps": 3}})
    assert _unlearn(plain, tmp_path) == 0
    _assert_equal_weights(_weights(tmp_path / "rule" / "model"), _weights(tmp_path / "plain" / "model"))


def test_the_zero3_release_memo_is_cleared_only_after_no_grad_forwards(toy_world, tmp_path, monkeypatch):
    """DeepSpeed 0.19.8's stale release memo (engine.forget_zero3_release_decisions) is cleared on the first two
    optimizer steps after the engine ran no-grad forwards (the "before" evaluation, every evaluation), not on every
    step: clearing costs ~12% of a step (benchmarks/RESULTS.md section 8)."""
    from dsunlearn import engine as E
    from dsunlearn import loop
    steps, cleared = [], []
    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda run, step: steps.append(step) or real_step(run, step))
    monkeypatch.setattr(E, "forget_zero3_release_decisions", lambda: cleared.append(steps[-1]))
    cfg = write_run_config(tmp_path / "memo.json", toy_world, tmp_path / "memo", method={"name": "ga_gd"},
                           data={"general": None}, train={"num_steps": 8, "micro_batch_size": 2, "grad_accum": 2},
                           eval={"every_n_steps": 3, "max_chunks": 4, "micro_batch_size": 4, "split_check": False,
                                 "mia": False})
    assert _unlearn(cfg, tmp_path) == 0
    # Evaluations after steps 3 and 6; each of the two steps after a no-grad pass clears before each micro-step.
    assert cleared == [0, 0, 1, 1, 3, 3, 4, 4, 6, 6, 7, 7]
