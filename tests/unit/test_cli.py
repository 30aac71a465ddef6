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


def test_lm_eval_hook_builds_the_call(toy_world, tmp_path, capsys):
    assert main(["lm-eval", "--model", toy_world["model"], "--tasks", "arc_easy,hellaswag", "--out",
                 str(tmp_path / "lm"), "--limit", "10", "--include-path", str(tmp_path), "--print-only"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[0].endswith("lm_eval") and cmd[cmd.index("--model") + 1] == "hf"
    assert cmd[cmd.index("--model_args") + 1] == f"pretrained={Path(toy_world['model']).resolve()},dtype=float32"
    assert cmd[cmd.index("--tasks") + 1] == "arc_easy,hellaswag"
    assert cmd[cmd.index("--limit") + 1] == "10" and cmd[cmd.index("--device") + 1] == "cpu"
    assert "trust_remote_code" not in " ".join(cmd)  # off unless asked
    assert main(["lm-eval", "--model", str(tmp_path), "--tasks", "x", "--out", "o", "--print-only"]) == 2


@pytest.mark.slow
def test_lm_eval_runs_offline_on_a_local_task(toy_world, tmp_path):
    """Really runs lm-eval (when installed) on a tiny task defined over a local JSONL file: no network."""
    import shutil
    import subprocess
    if shutil.which("lm_eval") is None:
        pytest.skip("lm-eval not installed (pip install 'dsunlearn[lm_eval]')")
    (tmp_path / "tiny.jsonl").write_text("\n".join(json.dumps({"text": f"w{i} w{i+1} w{i+2}."}) for i in range(8)))
    (tmp_path / "tiny.yaml").write_text(
        "task: dsunlearn_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'tiny.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    from dsunlearn.eval.downstream import lm_eval_command
    cmd = lm_eval_command(toy_world["model"], ["dsunlearn_tiny"], str(tmp_path / "out"), include_path=str(tmp_path),
                          batch_size=2)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert list((tmp_path / "out").rglob("results*.json"))


def test_readme_run_config_and_commands_dry_run(toy_world, tmp_path, capsys):
    """The README's run config (paths pointed at the toy world) resolves with the README's ZeRO config."""
    import re
    readme = (REPO / "README.md").read_text()
    cfg = json.loads(re.search(r"```json\n(.*?)```", readme, re.S).group(1))
    cfg["model"]["path"] = toy_world["model"]
    for split in ("forget", "retain", "approximate"):
        cfg["data"][split] = toy_world[split]
    cfg["data"]["seq_len"] = 64
    cfg["output"]["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    for line in readme.splitlines():
        if "dsunlearn unlearn --config run.json" in line and "python -m" in line:
            args = line.split("python -m dsunlearn ", 1)[1].split("#")[0].split()
            args = [str(path) if a == "run.json" else str(REPO / a) if a.startswith("ds_configs/") else a
                    for a in args]
            assert main(args + ["--dry-run", "--world-size", "8"]) == 0
            assert json.loads(capsys.readouterr().out)["zero_config"]["train_batch_size"] == 1 * 4 * 8
            break
    else:
        raise AssertionError("README shows no `python -m dsunlearn unlearn --config run.json` line")


def test_eval_scores_a_model_directory_on_its_own(toy_world, tmp_path, capsys):
    """`dsunlearn eval --model DIR`: every split, the attacks, a verdict judged without a "before" (there is none),
    metrics.json and report.md in --out; the model directory is read, never written."""
    import hashlib
    from helpers import CPU_ZERO3
    model = Path(toy_world["model"])
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir() if p.is_file()}
    cfg = write_run_config(tmp_path / "eval.json", toy_world, tmp_path / "unused",
                           eval={"max_chunks": 8, "micro_batch_size": 4, "split_check": False})
    out = tmp_path / "scored"
    assert main(["eval", "--model", str(model), "--config", str(cfg), "--zero", CPU_ZERO3, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["after"]["splits"]) == {"forget", "retain", "approximate", "general"}
    assert metrics["steps"] == 0 and metrics["judgement"]["status"] != "cannot judge"
    assert metrics["verdict"].startswith(metrics["judgement"]["status"])
    assert "privleak" in metrics["distance_to_retraining"] and "mia" in metrics["after"]
    assert f"**verdict: {metrics['verdict']}**" in (out / "report.md").read_text()
    assert '"verdict"' in capsys.readouterr().out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir() if p.is_file()} == before
    # Nothing of the ZeRO-3 load outlives the command: a model built next in this process is a plain one (a lingering
    # HfDeepSpeedConfig made transformers build a meta-device model under zero.Init: an error, or for a 6B config
    # 24 GB of RAM).
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    assert not is_deepspeed_zero3_enabled()


def test_dry_run_plans_a_model_directory_without_weights(toy_world, tmp_path, capsys):
    """The memory plan reads no weights, so --dry-run takes a directory with only config.json and the tokenizer (the
    7B plan in docs/distributed.md) and says the weights were not checked; a real run still refuses it."""
    from transformers import AutoConfig, AutoTokenizer
    from helpers import CPU_ZERO3
    shape = tmp_path / "shape"
    AutoConfig.from_pretrained(toy_world["model"]).save_pretrained(shape)
    AutoTokenizer.from_pretrained(toy_world["model"]).save_pretrained(shape)
    assert (shape / "config.json").is_file() and not list(shape.glob("*.safetensors"))
    refusal = f"model.path: {shape} has no .safetensors weights"
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run", model={"path": str(shape)})
    args = ["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]
    assert main(args + ["--dry-run"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["weights_not_checked"] == [refusal] and out["memory_plan"]["peak_bytes"] > 0
    assert f"weights not checked (a dry run reads none); a real run stops: {refusal}" in captured.err
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"dsunlearn: error: {refusal}"
    assert not (tmp_path / "run").exists()
    # With weights there is nothing to say.
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run")
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["weights_not_checked"] == [] and "weights not checked" not in captured.err
