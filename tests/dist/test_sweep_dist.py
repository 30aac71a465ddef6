"""``dsunlearn sweep`` under a 2-rank launcher: every rank iterates the same points in one process (a ZeRO-3 engine
pair per point, released between points); a relaunch runs nothing; a resume at another world size is refused."""
from __future__ import annotations

import json

from dsunlearn.cli import main
from helpers import CPU_ZERO3, free_port, run_cli, write_run_config, deepspeed_launcher


def test_two_rank_sweep_runs_every_point_once_and_resumes(toy_world, tmp_path, capsys):
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "unused",
                           eval={"max_chunks": 4, "micro_batch_size": 2, "mia": False, "split_check": False,
                                 "splits": ["forget", "retain", "approximate"]})
    out = tmp_path / "sweep"
    args = ["sweep", "--config", str(cfg), "--zero", CPU_ZERO3, "--grid", "train.lr=1e-3", "--grid",
            "train.num_steps=1,2", "--methods", "ga_kl", "--out", str(out)]
    launcher = deepspeed_launcher(2)
    p = run_cli(args, launcher=launcher)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "engine(s) of finished points are still alive" not in p.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert [(r["complete"], r["steps"]) for r in summary["points"]] == [(True, 1), (True, 2)]
    for r in summary["points"]:
        assert json.loads((tmp_path / r["run_dir"] / "ds_config.json").read_text())["train_batch_size"] == 2 * 2
    mtimes = [(tmp_path / r["run_dir"] / "summary.json").stat().st_mtime_ns for r in summary["points"]]

    p = run_cli(args, launcher=deepspeed_launcher(2))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 points, 2 complete, 0 to run" in p.stderr
    assert [(tmp_path / r["run_dir"] / "summary.json").stat().st_mtime_ns for r in summary["points"]] == mtimes

    # One rank would halve the global batch: finished points of the 2-rank sweep must not be mixed with new ones.
    assert main(args) == 2
    assert "ZeRO config train_batch_size" in capsys.readouterr().err
