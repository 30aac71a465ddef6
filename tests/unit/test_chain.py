"""Removal requests one after another (dsunlearn/chain.py): the chain is recorded, every earlier forget set is
re-evaluated, a request for another base model or after a changed model is refused, a killed request resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsunlearn.cli import main
from dsunlearn.data import sha256_file
from helpers import CPU_ZERO3, REPO, launch_env, run_cli, write_run_config

STEPS = 4


def _split_forget(toy_world, root: Path) -> list[str]:
    lines = Path(toy_world["forget"]).read_text().splitlines()
    paths = []
    for i, part in enumerate((lines[:8], lines[8:])):
        path = root / f"forget_{i + 1}.jsonl"
        path.write_text("\n".join(part) + "\n")
        paths.append(str(path))
    return paths


def _request_config(toy_world, root: Path, name: str, forget: str, **sections) -> Path:
    return write_run_config(root / f"{name}.json", toy_world, root / name, data={"forget": forget},
                            train={"num_steps": STEPS, "lr": 5e-3}, checkpoint={"every_n_steps": 1}, **sections)


@pytest.fixture(scope="module")
def chain(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    forget = _split_forget(toy_world, root)
    assert main(["unlearn", "--config", str(_request_config(toy_world, root, "r1", forget[0])), "--zero", CPU_ZERO3]) == 0
    cfg2 = _request_config(toy_world, root, "r2", forget[1])
    assert main(["unlearn", "--config", str(cfg2), "--zero", CPU_ZERO3, "--after", str(root / "r1")]) == 0
    return {"root": root, "forget": forget, "cfg2": cfg2}


def test_chain_is_recorded_request_by_request(chain, toy_world):
    root = chain["root"]
    first = json.loads((root / "r1" / "chain.json").read_text())
    second = json.loads((root / "r2" / "chain.json").read_text())
    assert first["original"] == second["original"]
    assert first["original"]["path"] == str(Path(toy_world["model"]).resolve())
    assert [r["index"] for r in second["requests"]] == [1, 2]
    r1, r2 = second["requests"]
    assert r1 == first["requests"][0]  # the earlier entry is carried over unchanged
    assert r1["start_model"]["sha256"] == first["original"]["sha256"]
    assert r2["start_model"] == {"path": str((root / "r1" / "model").resolve()), "sha256": r1["result_model"]["sha256"]}
    assert r2["result_model"]["path"] == str((root / "r2" / "model").resolve())
    assert r2["result_model"]["sha256"] != r1["result_model"]["sha256"]
    assert r2["forget_sha256"] == sha256_file(chain["forget"][1]) and r2["after"] == str((root / "r1").resolve())
    config = json.loads((root / "r2" / "config.json").read_text())
    assert config["model"]["path"] == str(root / "r1" / "model")  # request 2 started from request 1's result


def test_every_earlier_forget_set_is_reevaluated(chain):
    metrics = json.loads((chain["root"] / "r2" / "metrics.json").read_text())
    assert metrics["chain"]["requests"][-1]["index"] == 2
    for state in ("before", "after"):
        assert "forget@1" in metrics[state]["splits"] and "forget" in metrics[state]["splits"]
        assert set(metrics[state]["earlier"]) == {"forget@1"}
        assert 0 <= metrics[state]["earlier"]["forget@1"]["strongest_auc"] <= 1
    # Request 2's "before" is request 1's result: its own forget set scored the same way there.
    r1 = json.loads((chain["root"] / "r1" / "metrics.json").read_text())
    assert metrics["before"]["splits"]["forget@1"]["loss"] == pytest.approx(r1["after"]["splits"]["forget"]["loss"],
                                                                           rel=1e-6)
    report = (chain["root"] / "r2" / "report.md").read_text()
    assert "## Earlier removal requests (this is request 2 of the chain" in report and "| forget@1 |" in report


def test_a_request_for_another_base_model_is_refused(chain, toy_world, tmp_path, capsys):
    from transformers import AutoTokenizer
    from dsunlearn.toy import make_tiny_llama
    other = make_tiny_llama(str(tmp_path / "other"), AutoTokenizer.from_pretrained(toy_world["model"]), seed=3)
    cfg = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "r3", data={"forget": chain["forget"][1]},
                           model={"path": other})
    capsys.readouterr()
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--after", str(chain["root"] / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not the original model of the chain" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r3").exists()


def test_a_request_after_a_changed_model_is_refused(chain, toy_world, tmp_path, capsys):
    import shutil
    prev = tmp_path / "r1"
    shutil.copytree(chain["root"] / "r1", prev)
    weights = prev / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    cfg = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "r2b", data={"forget": chain["forget"][1]})
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--after", str(prev)]) == 2
    assert "changed since that run exported it" in capsys.readouterr().err
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--after", str(tmp_path)]) == 2  # not a run
    assert not (tmp_path / "r2b").exists()


def _request2(toy_world, chain, root: Path, name: str) -> Path:
    """Request 2 of the chain fixture, evaluated and checkpointed at every step."""
    return write_run_config(root / f"{name}.json", toy_world, root / name, data={"forget": chain["forget"][1]},
                            train={"num_steps": STEPS, "lr": 5e-3}, checkpoint={"every_n_steps": 1},
                            eval={"every_n_steps": 1})


def _request2_cmd(cfg: Path, chain) -> list[str]:
    return [sys.executable, "-m", "dsunlearn", "unlearn", "--config", str(cfg), "--zero", CPU_ZERO3,
            "--after", str(chain["root"] / "r1")]


@pytest.fixture(scope="module")
def uninterrupted(chain, toy_world, tmp_path_factory):
    """Request 2 run whole, in its own process like the killed and resumed ones: nothing of this test process
    (threads, what earlier tests loaded) takes part in the comparison."""
    cfg = _request2(toy_world, chain, tmp_path_factory.mktemp("whole"), "r2")
    p = subprocess.run(_request2_cmd(cfg, chain), env=launch_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return cfg.parent / "r2"


KILL_POINTS = {
    # Right after the step-2 checkpoint's latest.json: the run is in step 3 (or its evaluation or checkpoint).
    "after a checkpoint": lambda run_dir: _logged_step(run_dir / "checkpoints" / "latest.json", "step") >= 2,
    # Right after the step-2 evaluation was recorded: the run is in the step-2 checkpoint save or step 3.
    "after an evaluation": lambda run_dir: _logged_step(run_dir / "eval_state.json", "history") >= 2,
}


def _logged_step(path: Path, key: str) -> int:
    try:
        value = json.loads(path.read_text())[key]
    except (OSError, ValueError, KeyError):
        return -1
    return value[-1]["step"] if isinstance(value, list) else value


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_request_resumes_and_keeps_its_chain(chain, uninterrupted, toy_world, tmp_path, point):
    """Request 2 again, killed (SIGKILL) at ``point``, resumed with --resume: the uninterrupted request's weights
    bit for bit, so the same result hash in chain.json (what the next --after checks), the earlier forget set
    evaluated."""
    from safetensors.torch import load_file
    cfg = _request2(toy_world, chain, tmp_path, "r2")
    run_dir = tmp_path / "r2"
    proc = subprocess.Popen(_request2_cmd(cfg, chain), env=launch_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not KILL_POINTS[point](run_dir):
        time.sleep(0.01)
    assert proc.poll() is None, "the request ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists()
    p = run_cli(["unlearn", "--resume", str(run_dir)])
    assert p.returncode == 0, p.stderr[-3000:]
    want, got = load_file(uninterrupted / "model" / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    resumed = json.loads((run_dir / "chain.json").read_text())
    assert [r["index"] for r in resumed["requests"]] == [1, 2]
    assert resumed["requests"][1]["result_model"]["sha256"] == json.loads(
        (uninterrupted / "chain.json").read_text())["requests"][1]["result_model"]["sha256"]
    assert "forget@1" in json.loads((run_dir / "metrics.json").read_text())["after"]["splits"]


def test_the_chain_records_the_model_of_the_last_export(chain, toy_world, tmp_path):
    """Stop rule on and no evaluation during training: the final evaluation exports model/, after which the result
    hash is taken (it used to be taken before, and stayed null)."""
    from dsunlearn.chain import model_hash
    cfg_path = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "r2", data={"forget": chain["forget"][1]},
                                train={"num_steps": 3, "lr": 5e-3},
                                eval={"every_n_steps": 10, "stop_tolerance": 0.1, "allow_unjudged": True})
    assert main(["unlearn", "--config", str(cfg_path), "--zero", CPU_ZERO3, "--after", str(chain["root"] / "r1")]) == 0
    recorded = json.loads((tmp_path / "r2" / "chain.json").read_text())["requests"][-1]["result_model"]
    from dsunlearn.config import load_run_config
    assert recorded["sha256"] == model_hash(load_run_config(str(cfg_path)), str(tmp_path / "r2" / "model"))
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["exported_step"] == 3


def test_a_run_without_a_recorded_result_is_refused(chain, toy_world, tmp_path, capsys):
    import shutil
    prev = tmp_path / "r1"
    shutil.copytree(chain["root"] / "r1", prev)
    record = json.loads((prev / "chain.json").read_text())
    record["requests"][-1]["result_model"] = None
    (prev / "chain.json").write_text(json.dumps(record))
    cfg = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "r2", data={"forget": chain["forget"][1]})
    capsys.readouterr()
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--after", str(prev)]) == 2
    err = capsys.readouterr().err.strip()
    assert "records no result model for request 1" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("damage", ["truncated", "no requests", "not json"])
def test_a_corrupt_chain_record_is_one_line_and_exit_2(chain, toy_world, tmp_path, capsys, damage):
    import shutil
    prev = tmp_path / "r1"
    shutil.copytree(chain["root"] / "r1", prev)
    text = (prev / "chain.json").read_text()
    (prev / "chain.json").write_text({"truncated": text[: len(text) // 2],
                                      "no requests": json.dumps({**json.loads(text), "requests": []}),
                                      "not json": "\x00\x01"}[damage])
    cfg = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "r2", data={"forget": chain["forget"][1]})
    capsys.readouterr()
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--after", str(prev)]) == 2
    err = capsys.readouterr().err.strip()
    assert "chain.json: not a readable chain record" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r2").exists()


def test_an_empty_model_path_is_refused_before_hashing(toy_world, tmp_path, capsys, monkeypatch):
    from dsunlearn import chain as C
    monkeypatch.setattr(C, "model_hash", lambda *a: pytest.fail("hashed before refusing"))
    cfg = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "r1", model={"path": ""})
    capsys.readouterr()
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]) == 2
    assert "model.path: expected the model directory" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists()


def test_a_dry_run_hashes_no_weights_and_writes_no_memo(chain, toy_world, tmp_path, capsys, monkeypatch):
    from dsunlearn import chain as C
    monkeypatch.setattr(C, "model_hash", lambda *a: pytest.fail("a dry run hashed a model"))
    cache = tmp_path / "cache"
    cfg = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "r3", data={"forget": chain["forget"][0]},
                           reference={"cache_dir": str(cache)})
    capsys.readouterr()
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--after", str(chain["root"] / "r2"),
                 "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["chain"]["requests"][-1]["start_model"]["sha256"] is None
    assert not cache.exists() and not (tmp_path / "r3").exists()


def test_the_audit_command_takes_the_chains_original(chain, monkeypatch, tmp_path):
    """``dsunlearn audit`` on request 2's model with request 2's own config (whose model.path is request 1's
    model): the original is the chain's, as in the run's own audits."""
    from dsunlearn.chain import original_of
    from dsunlearn.config import load_run_config
    from dsunlearn.eval import audit
    cfg = load_run_config(str(chain["root"] / "r2" / "config.json"))
    assert cfg.model.path == str(chain["root"] / "r1" / "model")
    original = json.loads((chain["root"] / "r1" / "chain.json").read_text())["original"]["path"]
    assert original_of(str(chain["root"] / "r2" / "model"), cfg.model.path) == original
    assert original_of(str(tmp_path), "given") == "given"  # not a run's model/: model.path
    seen = {}
    monkeypatch.setattr(audit, "run_audits", lambda p, model, twin, orig: seen.setdefault("original", orig) and {
        "failures": [], "relearn": None})
    monkeypatch.setattr(audit, "audit_section", lambda *a: [])
    audit.run_audit_command(cfg, CPU_ZERO3, str(chain["root"] / "r2" / "model"), str(tmp_path / "out"), None,
                            ("relearn",))
    assert seen["original"] == original


def test_a_later_request_is_judged_against_the_chain_original(chain):
    """Target and utility of request 2 come from the original model (request 1's "before"), not from request 1's
    result: a chain cannot drift one tolerated step at a time."""
    r1 = json.loads((chain["root"] / "r1" / "metrics.json").read_text())
    r2 = json.loads((chain["root"] / "r2" / "metrics.json").read_text())
    original = r1["before"]["splits"]
    assert r1["original"] is None and r2["original"] is not None
    for split in ("retain", "approximate"):
        assert r2["original"]["splits"][split]["loss"] == pytest.approx(original[split]["loss"], rel=1e-6)
    assert r2["after"]["target"] == pytest.approx(original["approximate"]["loss"], rel=1e-6)
    assert r2["after"]["target"] != pytest.approx(r2["before"]["splits"]["approximate"]["loss"], rel=1e-6)
    assert "measured against the chain's original model" in (chain["root"] / "r2" / "report.md").read_text()


def test_utility_is_judged_against_the_original_when_given():
    from dsunlearn.eval.verdict import judge
    split = lambda loss: {"loss": loss, "num_chunks": 50}  # noqa: E731
    original = {"splits": {"forget": split(2.0), "retain": split(3.0), "approximate": split(3.0)}}
    before = {"splits": {"forget": split(3.5), "retain": split(3.4), "approximate": split(3.4)}}  # request 1's result
    now = {"splits": {"forget": split(4.0), "retain": split(3.45), "approximate": split(3.45)}, "target": 3.9}
    kwargs = dict(stop_tolerance=0.1, utility_tolerance=0.03, auc_band=None)
    alone = judge(now, before, None, **kwargs)
    assert alone["ok"] and alone["figures"]["retain_rise"] == pytest.approx(0.05 / 3.4)
    chained = judge(now, before, None, original=original, **kwargs)
    assert chained["status"] == "over-unlearned" and chained["figures"]["retain_rise"] == pytest.approx(0.15)


def test_dry_run_after_plans_the_request_and_writes_nothing(chain, toy_world, tmp_path, capsys):
    cfg = write_run_config(tmp_path / "r.json", toy_world, tmp_path / "r3", data={"forget": chain["forget"][0]})
    capsys.readouterr()
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--after", str(chain["root"] / "r2"),
                 "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["run_config"]["model"]["path"] == str(chain["root"] / "r2" / "model")
    assert [r["index"] for r in plan["chain"]["requests"]] == [1, 2, 3]
    assert not (tmp_path / "r3").exists()
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--after", str(chain["root"] / "r2"),
                 "--resume", str(chain["root"] / "r2")]) == 2  # a resumed run already knows its chain
