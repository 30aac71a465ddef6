"""Every method under real ZeRO-3 on 2 CPU ranks (gloo), in ONE launch.

A launch costs ~15 s of imports and process-group setup, a 2-step run a few seconds, so ``multi_unlearn.py`` runs all
the configs below one after another in the same two processes, each through ``loop.unlearn`` exactly as
``python -m dsunlearn unlearn`` does. What runs on 2 ranks: ga, random_labels, adversarial_labels, ga_gd with general
retain data, ga_kl (reference engine; cache with k = vocab; cache with k = 8), npo (engine; cache), simnpo, rmu
(engine; cache), and ga_kl and rmu again with activation checkpointing.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import CPU_ZERO3, REPO, free_port, launch_env, write_run_config, deepspeed_launcher

NUM_STEPS = 2
RMU = {"layer": 1, "trainable_params": r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"}
RUNS = {
    "ga": {"method": {"name": "ga"}},
    "random_labels": {"method": {"name": "random_labels"}},
    "adversarial_labels": {"method": {"name": "adversarial_labels"}},
    "ga_gd_general": {"method": {"name": "ga_gd"}, "data": {"retain_source": "general"}},
    "ga_kl_engine": {"method": {"name": "ga_kl"}, "reference": {"mode": "engine"}},
    "ga_kl_cache": {"method": {"name": "ga_kl"}, "reference": {"mode": "cache", "topk": 100000}},
    "ga_kl_top8": {"method": {"name": "ga_kl"}, "reference": {"mode": "cache", "topk": 8}},
    "npo_engine": {"method": {"name": "npo"}, "reference": {"mode": "engine"}},
    "npo_cache": {"method": {"name": "npo"}, "reference": {"mode": "cache"}},
    "simnpo": {"method": {"name": "simnpo"}},
    "rmu_engine": {"method": {"name": "rmu", "params": RMU}, "reference": {"mode": "engine"}},
    "rmu_cache": {"method": {"name": "rmu", "params": RMU}, "reference": {"mode": "cache"}},
    # train.activation_checkpointing under ZeRO-3 (the recompute gathers each layer's shards again), also with RMU's
    # mostly frozen model.
    "ga_kl_engine_ckpt": {"method": {"name": "ga_kl"}, "reference": {"mode": "engine"},
                          "train": {"activation_checkpointing": True}},
    "rmu_engine_ckpt": {"method": {"name": "rmu", "params": RMU}, "reference": {"mode": "engine"},
                        "train": {"activation_checkpointing": True}},
}


@pytest.fixture(scope="module")
def runs(toy_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods_dist")
    configs = []
    for name, sections in RUNS.items():
        sections = {**sections, "train": {"micro_batch_size": 2, "num_steps": NUM_STEPS, "lr": 1e-3,
                                          "warmup_ratio": 0.0, **sections.get("train", {})},
                    "eval": {"splits": []}, "output": {"run_dir": str(root / "runs" / name), "save_model": False}}
        configs.append(str(write_run_config(root / f"{name}.json", toy_world, root / "runs" / name, **sections)))
    cmd = deepspeed_launcher(2) + [
           str(REPO / "tests" / "dist" / "multi_unlearn.py"), "--zero", CPU_ZERO3, *configs]
    p = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    return root / "runs"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith(("loss/", "nll/"))} for r in _rows(run_dir)]


def test_every_method_ran_on_two_ranks(runs):
    for name in RUNS:
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["exit_code"] == 0 and summary["steps"] == NUM_STEPS, (name, summary)
        assert json.loads((runs / name / "ds_config.json").read_text())["train_batch_size"] == 4  # 2 ranks x 2
        rows = _rows(runs / name)
        assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
        assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss/")), name
    assert json.loads((runs / "ga_gd_general" / "data_stats.json").read_text())["retain"]["source"].endswith(
        "general.jsonl")


@pytest.mark.parametrize("method", ["npo", "ga_kl", "rmu"])
def test_cache_equals_engine_on_two_ranks(runs, method):
    """The same losses, bit for bit, at every step (k = vocab for KL): the cache pass ran the reference engine's
    batch shapes on the trained engine before its first step."""
    assert _losses(runs / f"{method}_cache") == _losses(runs / f"{method}_engine")
    reference = json.loads((runs / f"{method}_cache" / "reference.json").read_text())["reference"]
    assert reference["mode"] == "cache" and all(e["built"] for e in reference["entries"].values())


@pytest.mark.parametrize("method", ["ga_kl", "rmu"])
def test_activation_checkpointing_gives_the_same_losses_under_zero3(runs, method):
    plain, ckpt = _losses(runs / f"{method}_engine"), _losses(runs / f"{method}_engine_ckpt")
    assert [row.keys() for row in ckpt] == [row.keys() for row in plain]
    for step, (a, b) in enumerate(zip(plain, ckpt), start=1):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (method, step, key)
    resolved = json.loads((runs / f"{method}_engine_ckpt" / "config.json").read_text())
    assert resolved["train"]["activation_checkpointing"] is True


def test_kl_is_zero_at_step_zero(runs):
    for name in ("ga_kl_engine", "ga_kl_cache"):
        assert _rows(runs / name)[0]["loss/retain"] == 0.0, name
    assert abs(_rows(runs / "ga_kl_top8")[0]["loss/retain"]) < 1e-6


def test_topk_kl_error_is_reported(runs, capsys):
    entry = json.loads((runs / "ga_kl_top8" / "reference.json").read_text())["reference"]["entries"]["logits/retain"]
    assert entry["topk"] == 8 and entry["exact"] is False and entry["topk_stats"]["rest_mass_mean"] > 0
    exact, top8 = _rows(runs / "ga_kl_engine")[1]["loss/retain"], _rows(runs / "ga_kl_top8")[1]["loss/retain"]
    assert 0 < top8 <= exact  # a lower bound (same weights at step 2: step 1's update saw KL = 0 in both runs)
    with capsys.disabled():
        print(f"\n2 ranks, step 2: exact KL {exact:.4g}, top-8 cached KL {top8:.4g} "
              f"({(exact - top8) / exact:.1%} short); theta_0 mass outside the top 8: "
              f"{entry['topk_stats']['rest_mass_mean']:.3g} mean")


def test_adversarial_labels_from_the_distributed_pass(runs, toy_world):
    """The labels the 2 ranks computed (each a shard, gathered) equal a single-process computation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from dsunlearn import reference as R
    from dsunlearn.config import load_run_config
    from dsunlearn.data import collate
    from dsunlearn.data import load_stream
    from dsunlearn.methods.terms import adversarial_targets
    run = runs / "adversarial_labels"
    entry = json.loads((run / "reference.json").read_text())["precomputed"]["adversarial_labels/forget"]
    meta, stores = R.open_entry(Path(entry["path"]))
    cfg = load_run_config(str(run / "config.json"))
    tok = AutoTokenizer.from_pretrained(toy_world["model"])
    stream = load_stream("forget", toy_world["forget"], cfg.data, tok)
    rows = list(range(stream.stats.num_chunks))
    batch = collate(stream.chunks[rows]["input_ids"], cfg.data.seq_len, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(toy_world["model"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    excluded = torch.cat([torch.tensor(sorted(set(tok.all_special_ids))), torch.arange(len(tok), logits.size(-1))])
    assert torch.equal(stores["labels"].read(rows).long(), adversarial_targets(logits, batch["labels"], excluded))
    precomputed = json.loads((runs / "random_labels" / "reference.json").read_text())["precomputed"]
    assert precomputed["random_labels/forget"]["built"]
