"""A failure on one rank while a 2-rank run finishes (dsunlearn/finish.py): every rank stops within seconds with
the error, and model/, summary.json and metrics.json are as complete as the failure allows. One launch runs every
case (tests/dist/fail_finish.py), each its own short run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import CPU_ZERO3, REPO, deepspeed_launcher, launch_env, write_run_config

# part@rank -> is model/ there afterwards? (the failing part's own work is done, then the fault is raised; a failed
# collective part stops the collective parts after it, a failed part of one rank alone (cost) stops nothing)
CASES = {
    "final checkpoint@1": False, "cost@1": True, "final evaluation@1": False, "export@1": True,
    "write@0": False, "chain record@1": True, "audits@1": True, "generated memorisation metrics@1": True,
    "evaluation report@1": True,
}


@pytest.fixture(scope="module")
def outcomes(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("finish_faults")
    args = []
    for i, case in enumerate(CASES):
        extra = {"eval": {"audits": ["quantize"]}, "audit": {"quantize_bits": [8]}} if case.startswith("audits") \
            else {"eval": {"generation_prompts": 2, "verbmem_tokens": 4, "splits": ["forget", "approximate"]}} \
            if case.startswith("generated") else {}
        cfg = write_run_config(root / f"c{i}.json", toy_world, root / f"run{i}",
                               train={"num_steps": 2}, eval={"max_chunks": 8, **extra.get("eval", {})},
                               **{k: v for k, v in extra.items() if k != "eval"})
        args.append(f"{cfg}:{case}")
    cmd = deepspeed_launcher(2) + [str(REPO / "tests" / "dist" / "fail_finish.py"), "--zero", CPU_ZERO3,
                                   "--out", str(root / "outcome")] + args
    p = subprocess.run(cmd, env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    ranks = [json.loads((root / f"outcome.rank{r}.json").read_text()) for r in (0, 1)]
    return {case: (root / f"run{i}", ranks[0][i], ranks[1][i]) for i, case in enumerate(CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_a_failure_on_one_rank_stops_every_rank_and_keeps_what_exists(outcomes, case):
    run_dir, rank0, rank1 = outcomes[case]
    failing = int(case.rsplit("@", 1)[1])
    mine, other = (rank0, rank1) if failing == 0 else (rank1, rank0)
    assert mine.get("error") == "InjectedFault", mine
    assert other.get("error") == "FailedElsewhere", other  # not a hang, not a silent success
    assert max(rank0["seconds"], rank1["seconds"]) < 120, (rank0, rank1)
    assert (run_dir / "model" / "model.safetensors").is_file() == CASES[case]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["model_exported"] == CASES[case]
    assert summary["errors"] and ("injected" in summary["errors"][0]) == (failing == 0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["before"]["splits"]["forget"]["loss"] > 0 and metrics["model_exported"] == CASES[case]
    if case.startswith(("final evaluation", "final checkpoint")):
        # Nothing collective after the failed part ran: the report has the last evaluation that exists.
        assert metrics["history"][-1]["step"] == (2 if case.startswith("final evaluation") else 0)
    if case.startswith("cost"):
        assert metrics["history"][-1]["step"] == 2 and summary["cost"] is not None  # rank 0's cost
    if case.startswith("chain record"):
        assert json.loads((run_dir / "chain.json").read_text())["requests"][-1]["result_model"]["sha256"]
    if case.startswith("audits"):  # rank 0's audits finished before rank 1 failed: kept
        assert metrics["audits"]["quantize"] is not None
    if case.startswith("generated"):  # likewise rank 0's generation, decoded together before rank 1 failed
        assert set(metrics["generation"]["scores"]) == {"before", "after"}


def test_a_corrupt_chain_is_one_line_and_exit_2_on_every_rank(toy_world, tmp_path):
    """--after a run whose chain.json is truncated, on 2 ranks: rank 0 reads it, every rank exits with code 2 and
    the user gets one line (it used to be rank 0's raw JSON traceback while rank 1 waited in the broadcast)."""
    import shutil
    import time
    from helpers import run_cli
    prev = tmp_path / "r1"
    (prev / "model").mkdir(parents=True)
    for f in Path(toy_world["model"]).iterdir():
        shutil.copy(f, prev / "model" / f.name)
    (prev / "config.json").write_text("{}")
    (prev / "summary.json").write_text("{}")
    (prev / "chain.json").write_text('{"schema_version": 1, "original": {"pa')
    cfg = write_run_config(tmp_path / "r2.json", toy_world, tmp_path / "r2")
    start = time.time()
    p = run_cli(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--after", str(prev)],
                launcher=deepspeed_launcher(2), timeout=300)
    errors = [line for line in (p.stdout + p.stderr).splitlines() if "dsunlearn: error:" in line]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(errors) == 1 and "chain.json: not a readable chain record" in errors[0], errors
    assert "Traceback" not in p.stderr and time.time() - start < 120
    assert not (tmp_path / "r2").exists()
