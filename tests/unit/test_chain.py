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


def test_a_killed_request_resumes_and_keeps_its_chain(chain, toy_world, tmp_path):
    """Request 2 again, killed (SIGKILL) after a checkpoint, resumed with --resume: the uninterrupted request's
    weights, the same chain (its result hash recorded), the earlier forget set evaluated."""
    from safetensors.torch import load_file
    run_dir = tmp_path / "r2"
    cfg = write_run_config(tmp_path / "r2.json", toy_world, run_dir, data={"forget": chain["forget"][1]},
                           train={"num_steps": STEPS, "lr": 5e-3}, checkpoint={"every_n_steps": 1})
    proc = subprocess.Popen([sys.executable, "-m", "dsunlearn", "unlearn", "--config", str(cfg), "--zero", CPU_ZERO3,
                             "--after", str(chain["root"] / "r1")], env=launch_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the request ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists()
    p = run_cli(["unlearn", "--resume", str(run_dir)])
    assert p.returncode == 0, p.stderr[-3000:]
    want, got = load_file(chain["root"] / "r2" / "model" / "model.safetensors"), load_file(
        run_dir / "model" / "model.safetensors")
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), key
    resumed = json.loads((run_dir / "chain.json").read_text())
    assert [r["index"] for r in resumed["requests"]] == [1, 2]
    assert resumed["requests"][1]["result_model"]["sha256"] == json.loads(
        (chain["root"] / "r2" / "chain.json").read_text())["requests"][1]["result_model"]["sha256"]
    assert "forget@1" in json.loads((run_dir / "metrics.json").read_text())["after"]["splits"]


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
