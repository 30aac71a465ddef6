"""``dsunlearn sweep``: a 2x2 grid on the toy world runs in one process, survives a crash mid-way, and a rerun
finishes it without rerunning finished points (issue 7). Plus the band / target arithmetic and the argument errors."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from dsunlearn import loop
from dsunlearn.cli import main
from dsunlearn.config import ConfigError
from dsunlearn.sweep import parse_grid, parse_methods, point_figures, point_name
from helpers import CPU_ZERO3, write_run_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")

POINTS = ["lr=0.001_num_steps=1", "lr=0.001_num_steps=2", "lr=0.01_num_steps=1", "lr=0.01_num_steps=2"]


def test_sweep_runs_resumes_without_rerunning_and_writes_outputs(toy_world, tmp_path, monkeypatch, capsys):
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "unused",
                           eval={"max_chunks": 4, "micro_batch_size": 4, "mia": False, "split_check": False,
                                 "splits": ["forget", "retain", "approximate"]})
    out = tmp_path / "sweep"
    args = ["sweep", "--config", str(cfg), "--zero", CPU_ZERO3, "--grid", "train.lr=1e-3,1e-2",
            "--grid", "train.num_steps=1,2", "--methods", "ga_gd", "--out", str(out)]
    real_unlearn, calls = loop.unlearn, []

    def killed_during_third(cfg, zero_path, **kw):
        calls.append(os.path.basename(cfg.output.run_dir))
        if len(calls) == 3:  # the process dies mid-run: a run directory with metrics.json but no summary.json
            run_dir = Path(cfg.output.run_dir)
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.json").write_text('{"after": {}}')
            (run_dir / "log.jsonl").write_text('{"step": 1}\n')
            raise RuntimeError("killed")
        return real_unlearn(cfg, zero_path, **kw)

    monkeypatch.setattr(loop, "unlearn", killed_during_third)
    with pytest.raises(RuntimeError, match="killed"):
        main(args)
    assert calls == POINTS[:3]
    partial = json.loads((out / "sweep.json").read_text())  # rewritten after every finished point
    assert [p["complete"] for p in partial["points"]] == [True, True, False, False]
    mtimes = {n: (out / "ga_gd" / n / "summary.json").stat().st_mtime_ns for n in POINTS[:2]}

    calls.clear()
    monkeypatch.setattr(loop, "unlearn", lambda cfg, zero_path, **kw: calls.append(
        os.path.basename(cfg.output.run_dir)) or real_unlearn(cfg, zero_path, **kw))
    assert main(args) == 0
    assert calls == POINTS[2:], "finished points must not run again; the killed one reruns from scratch"
    assert {n: (out / "ga_gd" / n / "summary.json").stat().st_mtime_ns for n in POINTS[:2]} == mtimes
    assert json.loads((out / "ga_gd" / POINTS[2] / "metrics.json").read_text())["after"]  # the partial one replaced

    summary = json.loads((out / "sweep.json").read_text())
    assert [p["params"] for p in summary["points"]] == [
        {"train.lr": lr, "train.num_steps": n} for lr in (1e-3, 1e-2) for n in (1, 2)]
    for p in summary["points"]:
        assert p["complete"] and p["steps"] == p["params"]["train.num_steps"]
        assert p["target_source"] == "original model: approximate loss"
        assert math.isclose(p["forget_gap"], p["forget_loss"] - p["target"])
        # In band = the run's own verdict of its exported weights (the same criteria as every run).
        metrics = json.loads((Path(p["run_dir"]) / "metrics.json").read_text())
        assert p["in_band"] == metrics["judgement"]["ok"] and p["verdict"] == metrics["verdict"]
    rob = summary["robustness"]["ga_gd"]
    assert rob["points"] == 4 and rob["robustness"] == rob["in_band"] / 4
    assert (out / "plots" / "heatmap_ga_gd.png").stat().st_size > 1000
    md = (out / "sweep.md").read_text()
    assert "| ga_gd | " in md and "plots/heatmap_ga_gd.png" in md and "## All points" in md
    assert f"ga_gd                  robustness {rob['robustness']:.2f}" in capsys.readouterr().out

    calls.clear()
    assert main(args) == 0 and calls == []  # complete: nothing runs, outputs are rewritten
    # A complete point run with another config is never mixed into the sweep silently.
    assert main(args + ["--set", "train.seed=7"]) == 2 and calls == []
    assert "was run with another config (differs in train.seed)" in capsys.readouterr().err


def _metrics(forget, retain, approx_before, retain_before, retrained_forget=None, ok=True):
    before = {"forget": {"loss": 1.0}, "retain": {"loss": retain_before}, "approximate": {"loss": approx_before}}
    after = {"forget": {"loss": forget}, "retain": {"loss": retain}, "approximate": {"loss": 3.0}}
    retrained = {"splits": {"forget": {"loss": retrained_forget}}} if retrained_forget is not None else None
    return {"before": {"splits": before}, "after": {"splits": after}, "retrained": retrained, "steps": 5,
            "exported_step": 5, "stop_reason": None, "verdict": "v", "judgement": {"ok": ok}}


def test_figures_use_the_retrained_target_when_there_is_one_and_the_band_is_the_verdict():
    f = point_figures(_metrics(forget=3.05, retain=2.05, approx_before=3.0, retain_before=2.0), 0.1, 0.1)
    assert f["target_source"] == "original model: approximate loss"
    assert math.isclose(f["forget_gap"], 0.05) and math.isclose(f["retain_degradation"], 0.05) and f["in_band"]
    f = point_figures(_metrics(3.05, 2.05, 3.0, 2.0, retrained_forget=3.3, ok=False), 0.1, 0.1)
    assert f["target_source"] == "retrained model: forget loss" and math.isclose(f["forget_gap"], -0.25)
    assert not f["in_band"] and not f["retain_degraded"]
    f = point_figures(_metrics(3.0, 2.5, 3.0, 2.0, ok=False), 0.1, 0.1)  # retain damaged: marked
    assert not f["in_band"] and f["retain_degraded"]
    f = point_figures(_metrics(3.0, 1.5, 3.0, 2.0), 0.1, 0.1)  # a lower retain loss is no damage
    assert f["in_band"] and not f["retain_degraded"]
    f = point_figures(_metrics(float("inf"), 2.0, 3.0, 2.0, ok=False), 0.1, 0.1)  # diverged
    assert f["forget_gap"] is None and not f["in_band"]
    # The band is the run's verdict, whatever the gaps say (a run judged "not forgotten" is out of it).
    assert not point_figures(_metrics(3.05, 2.05, 3.0, 2.0, ok=False), 0.1, 0.1)["in_band"]


def test_grid_and_method_specs():
    axes = parse_grid(["train.lr=1e-5, 2e-5", "train.num_steps=20,40"])
    assert [(a.key, a.values) for a in axes] == [("train.lr", (1e-5, 2e-5)), ("train.num_steps", (20, 40))]
    assert point_name({"train.lr": 1e-5, "train.num_steps": 20}) == "lr=1e-05_num_steps=20"
    assert point_name({"train.seed": 1, "data.seed": 2}) == "train.seed=1_data.seed=2"
    assert parse_methods("ga,ga_gd:general") == [("ga", None), ("ga_gd", "general")]
    for bad, fragment in [(["method.name=ga"], "use --methods"), (["train.lr=1e-5,1e-5"], "repeated value"),
                          (["train.lr=1e-5,"], "no empty value"), (["train.lr"], "expected section.key=v1,v2")]:
        with pytest.raises(ConfigError, match=fragment):
            parse_grid(bad)
    with pytest.raises(ConfigError, match="'retain' or 'general'"):
        parse_methods("ga_gd:wiki")


@pytest.mark.parametrize("methods, fragment", [
    ("ga:general", "ga has no retain stream"),
    ("ga_gd,ga_gd:retain", "ga_gd given twice"),
    ("nope", "unknown method 'nope'"),
])
def test_bad_sweeps_fail_before_running_anything(methods, fragment, toy_world, tmp_path, capsys):
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "unused")
    code = main(["sweep", "--config", str(cfg), "--zero", CPU_ZERO3, "--grid", "train.lr=1e-3",
                 "--methods", methods, "--out", str(tmp_path / "sweep")])
    assert code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_needs_a_target_and_the_retain_split(toy_world, tmp_path, capsys):
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "unused", data={"approximate": None})
    assert main(["sweep", "--config", str(cfg), "--zero", CPU_ZERO3, "--methods", "ga",
                 "--out", str(tmp_path / "sweep")]) == 2
    assert "approximate (or eval.retrained_model)" in capsys.readouterr().err
