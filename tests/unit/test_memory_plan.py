"""The --dry-run memory plan (dsunlearn/memory.py): DeepSpeed's estimators for the model states, a fake-tensor micro-step
for the transient memory (equal to the same micro-step on real tensors), the fit check and its first knob, the CLI."""
import json

import pytest
import torch

from dsunlearn.cli import main
from dsunlearn.config import ConfigError, load_run_config
from dsunlearn.memory import (GIB, HEADROOM, ModelCounts, count_parameters, model_states, parse_memory, plan_memory,
                              planned_model, simulate)
from dsunlearn.prepare import prepare
from helpers import CPU_ZERO3, REPO, write_run_config

ZERO3_BF16 = str(REPO / "ds_configs" / "zero3.json")
ZERO2_BF16 = str(REPO / "ds_configs" / "zero2.json")
ZERO3_OFFLOAD = str(REPO / "ds_configs" / "zero3_offload.json")


def _prepared(toy_world, tmp_path, zero=CPU_ZERO3, world_size=1, **sections):
    path = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run", **sections)
    return prepare(load_run_config(str(path)), zero, world_size)


@pytest.mark.parametrize("text, expected", [("80GB", 80 * GIB), ("80GiB", 80 * GIB), ("141G", 141 * GIB),
                                            ("24000MiB", 24000 * 2**20), ("1.5TB", int(1.5 * 2**40)),
                                            ("123456", 123456)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "80 parsecs", "-1GB", "0GB"])
def test_parse_memory_refuses_nonsense(text):
    with pytest.raises(ConfigError, match="--device-memory"):
        parse_memory(text)


def test_model_states_are_deepspeeds_estimates_for_16_bit():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    counts = ModelCounts(total=7_000_000_000, trainable=7_000_000_000, largest_layer=131_000_000)
    bf16_z3 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "reduce_bucket_size": 0}}
    for g in (1, 8, 64):
        ds = estimate_zero3_model_states_mem_needs(counts.total, counts.largest_layer, num_gpus_per_node=g,
                                                   cpu_offload=False, cpu_offload_params=False)[1]
        ours = model_states(counts, bf16_z3, g)
        assert ours["total"] == ds
        assert ours["weights"] == 2 * counts.total // g and ours["gathered_layer"] == 4 * counts.largest_layer
    offload = {**bf16_z3, "zero_optimization": {**bf16_z3["zero_optimization"], "offload_optimizer": {"device": "cpu"},
                                                "offload_param": {"device": "cpu"}}}
    assert model_states(counts, offload, 8)["total"] == 4 * counts.largest_layer
    bf16_z2 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "reduce_bucket_size": 0}}
    assert model_states(counts, bf16_z2, 8)["total"] == estimate_zero2_model_states_mem_needs(
        counts.total, num_gpus_per_node=8, cpu_offload=False)[1]


def test_fp32_model_states_are_20_bytes_per_parameter_and_frozen_ones_4():
    """fp32 ZeRO-3 as measured (benchmarks/bench_memory_plan.py): weights, gradients and DeepSpeed's separate fp32
    master partition at 4 bytes each, Adam's two moments at 8; a frozen parameter holds only its weight."""
    fp32_z3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}
    full = model_states(ModelCounts(total=10**8, trainable=10**8, largest_layer=10**7), fp32_z3, 4)
    assert full["total"] - full["gathered_layer"] - full["buckets"] == 20 * 10**8 // 4
    assert full["gathered_layer"] == 8 * 10**7 and full["buckets"] == 4000
    assert full["weights"] == full["gradients"] == 4 * 10**8 // 4 and full["optimizer"] == 12 * 10**8 // 4
    lora = model_states(ModelCounts(total=10**8, trainable=10**6, largest_layer=10**7), fp32_z3, 4)
    assert lora["total"] - lora["gathered_layer"] - lora["buckets"] == (20 * 10**6 + 4 * (10**8 - 10**6)) // 4


def test_counts_follow_adapters_and_frozen_parameters(toy_world, tmp_path):
    full = count_parameters(planned_model(_prepared(toy_world, tmp_path)))
    assert full.trainable == full.total
    lora = count_parameters(planned_model(_prepared(toy_world, tmp_path, adapter={"rank": 4})))
    assert 0 < lora.trainable < full.total // 10 and lora.total == full.total + lora.trainable
    config = json.loads(open(f"{toy_world['model']}/config.json").read())
    assert full.largest_layer == config["vocab_size"] * config.get("hidden_size", config.get("n_embd"))


@pytest.mark.parametrize("method, mode, adapter", [("ga_kl", "engine", 0), ("ga_kl", "cache", 0), ("npo", "engine", 0),
                                                   ("ga_gd", "engine", 0), ("rmu", "engine", 0),
                                                   ("ga_kl", "adapters_off", 4)])
def test_fake_micro_step_uses_the_memory_of_the_real_one(method, mode, adapter, toy_world, tmp_path):
    """The transient the plan counts is what the same micro-step allocates on real tensors (MemTracker both times)."""
    from dsunlearn.memory import _fake_batches, _peak_transient, micro_step
    from dsunlearn.reference import AdaptersOffReference, EngineReference, _check_needs
    params = {"layer": 1, "trainable_params": r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"} if method == "rmu" else {}
    p = _prepared(toy_world, tmp_path, method={"name": method, "params": params}, reference={"mode": mode},
                  adapter={"rank": adapter})
    planned = simulate(p, activation_checkpointing=False, reference_mode=mode)["step"]

    torch.manual_seed(0)
    model = planned_model(p).to_empty(device="cpu")
    for q in model.parameters():
        with torch.no_grad():
            torch.nn.init.normal_(q, std=0.02)
        if q.requires_grad:
            q.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
    batches = _fake_batches(p.method, p.cfg)
    needs, hidden_index = _check_needs(p.method)
    kind = AdaptersOffReference if mode == "adapters_off" else EngineReference
    reference = kind(model, needs, hidden_index) if needs else None
    if reference is not None and mode == "cache":
        cached = reference.outputs_for(batches, torch.device("cpu"))
        reference = type("Cached", (), {"outputs_for": lambda self, s, d: cached})()
    real = _peak_transient(lambda tracker: micro_step(model, p.method, p.weights, batches, reference, tracker))
    assert planned == pytest.approx(real, rel=0.05)
    assert planned > 2 * 4 * p.cfg.data.seq_len * p.model_config.vocab_size  # at least logits and their gradient
    if mode == "engine" and not adapter:
        plan = plan_memory(p)
        tokens = sum(p.method.stream_batch_size(n, p.cfg.train) for n in p.method.streams) * p.cfg.data.seq_len
        assert plan["logits_bytes"] == 2 * 4 * tokens * p.model_config.vocab_size
        assert plan["logits_bytes"] < plan["terms"]["activations, logits, loss terms"]


def test_checkpointing_and_batch_size_move_the_transient_the_right_way(toy_world, tmp_path):
    one = _prepared(toy_world, tmp_path, method={"name": "ga_gd"}, train={"micro_batch_size": 1})
    two = _prepared(toy_world, tmp_path, method={"name": "ga_gd"}, train={"micro_batch_size": 2})
    plain, ckpt = simulate(one, False, "none")["step"], simulate(one, True, "none")["step"]
    assert ckpt < plain
    assert 1.8 < simulate(two, False, "none")["step"] / plain < 2.2  # twice the tokens, twice the memory


def test_theta0_weights_only_in_engine_mode(toy_world, tmp_path):
    plans = {mode: plan_memory(_prepared(toy_world, tmp_path, method={"name": "ga_kl"}, reference={"mode": mode}))
             for mode in ("engine", "cache")}
    engine, cache = plans["engine"], plans["cache"]
    assert engine["terms"]["theta_0 weights"] == engine["terms"]["weights"] > 0
    assert cache["terms"]["theta_0 weights"] == 0
    assert engine["peak_bytes"] > cache["peak_bytes"]
    lora = plan_memory(_prepared(toy_world, tmp_path, method={"name": "ga_kl"}, adapter={"rank": 4}))
    assert lora["reference_mode"] == "adapters_off" and lora["terms"]["theta_0 weights"] == 0
    assert lora["terms"]["optimizer states"] < engine["terms"]["optimizer states"] / 10


def test_more_ranks_shard_the_model_states(toy_world, tmp_path):
    one = plan_memory(_prepared(toy_world, tmp_path, zero=ZERO3_BF16, world_size=1))
    eight = plan_memory(_prepared(toy_world, tmp_path, zero=ZERO3_BF16, world_size=8))
    assert eight["terms"]["optimizer states"] == pytest.approx(one["terms"]["optimizer states"] / 8, abs=8)
    assert eight["terms"]["activations, logits, loss terms"] == one["terms"]["activations, logits, loss terms"]
    z2 = plan_memory(_prepared(toy_world, tmp_path, zero=ZERO2_BF16, world_size=8))
    assert z2["terms"]["weights"] == one["terms"]["weights"]  # ZeRO-2 keeps every weight on every device


def test_fit_says_what_exceeds_and_the_first_knob(toy_world, tmp_path):
    p = _prepared(toy_world, tmp_path, method={"name": "ga_kl"}, reference={"mode": "engine"})
    plan = plan_memory(p)
    roomy = plan_memory(p, device_memory=2 * plan["peak_bytes"])
    assert roomy["fits"] and roomy["verdict"].startswith("fits")
    # Just too small: activation checkpointing alone brings the peak under the budget, so it is the first knob.
    ckpt_peak = plan["other_checkpointing"]["peak_bytes"]
    tight = plan_memory(p, device_memory=int(ckpt_peak / (1 - HEADROOM)) + 1024)
    assert not tight["fits"] and tight["first_knob"].startswith("set train.activation_checkpointing")
    assert tight["peak_after_knob"] == ckpt_peak and tight["exceeds"]
    # With checkpointing on, theta_0 as a cache is the next knob.
    p = _prepared(toy_world, tmp_path, method={"name": "ga_kl"}, reference={"mode": "engine"},
                  train={"activation_checkpointing": True})
    cache_peak = plan_memory(_prepared(toy_world, tmp_path, method={"name": "ga_kl"}, reference={"mode": "cache"},
                                       train={"activation_checkpointing": True}))["peak_bytes"]
    tight = plan_memory(p, device_memory=int(cache_peak / (1 - HEADROOM)) + 1024)
    assert not tight["fits"] and tight["first_knob"].startswith('set reference.mode to "cache"'), tight["verdict"]
    assert tight["knob_fits"] and tight["peak_after_knob"] == cache_peak
    # Far too small for any one knob: the plan says so and names the one that saves the most.
    tiny = plan_memory(p, device_memory=plan["terms"]["weights"])
    assert not tiny["fits"] and not tiny["knob_fits"] and "no single knob" in tiny["verdict"]


def test_dry_run_prints_the_plan_and_gates_on_device_memory(toy_world, tmp_path, capsys):
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run", method={"name": "ga_kl"})
    args = ["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--dry-run"]
    assert main(args) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)["memory_plan"]
    assert plan["peak_bytes"] == max(plan["phases"].values()) and "memory plan per device" in captured.err
    assert main(args + ["--device-memory", "80GB"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_plan"]["fits"]
    assert main(args + ["--device-memory", "1MiB"]) == 1
    captured = capsys.readouterr()
    assert "does not fit" in captured.err and not json.loads(captured.out)["memory_plan"]["fits"]
    assert main(args + ["--device-memory", "lots"]) == 2
    assert "--device-memory 'lots'" in capsys.readouterr().err
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--device-memory", "80GB"]) == 2
    assert "with --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_deep_models_are_extrapolated_exactly_from_two_depths(checkpointing, toy_world, tmp_path):
    from dsunlearn.memory import EXTRAPOLATE_FROM, simulate_depth, with_layers
    p = _prepared(toy_world, tmp_path, method={"name": "ga_kl"}, reference={"mode": "engine"})
    p.model_config = with_layers(p.model_config, EXTRAPOLATE_FROM[1] + 3)
    assert simulate(p, checkpointing, "engine") == simulate_depth(p, p.model_config, checkpointing, "engine")


def test_optimizer_step_temporaries_are_adamws_own_plus_the_fp32_gradient_copy():
    """The fake-tensor AdamW step allocates what a real one does; fp32 adds DeepSpeed's flat fp32 gradient copy, a
    ZeRO-3 sub-group bounds both, and an offloaded optimizer steps on the host."""
    from types import SimpleNamespace
    from dsunlearn.memory import _peak_transient, optimizer_step_bytes
    train = SimpleNamespace(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    n = 300_000

    def two_steps(_):
        flat = torch.nn.Parameter(torch.zeros(n))
        flat.grad = torch.ones(n)
        adamw = torch.optim.AdamW([flat], lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
        adamw.step()
        adamw.step()
    # On CPU AdamW's single-tensor path keeps two parameter-sized temporaries (the square root, the denominator);
    # resident memory says the same (1.998 x 4 bytes per element at 5e7 elements).
    real = _peak_transient(two_steps) - 16 * n
    assert real == pytest.approx(2 * 4 * n, rel=0.01)
    counts = ModelCounts(total=2 * n, trainable=2 * n, largest_layer=n // 10)
    bf16 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    fp32 = {"zero_optimization": {"stage": 3}}
    assert optimizer_step_bytes(counts, bf16, 2, train) == real
    assert optimizer_step_bytes(counts, fp32, 2, train) == real + 4 * n
    sub_group = {"zero_optimization": {"stage": 3, "sub_group_size": n // 3}}
    assert optimizer_step_bytes(counts, sub_group, 2, train) < real
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert optimizer_step_bytes(counts, offload, 2, train) == 0


def test_a_model_the_fake_tensors_cannot_run_still_gets_a_plan(toy_world, tmp_path, monkeypatch):
    """The dry run still validates and plans the model states; a fit it cannot confirm is not called a fit."""
    import dsunlearn.memory as M

    def broken(*a, **k):
        raise NotImplementedError("no fake kernel for aten::exotic")
    monkeypatch.setattr(M, "simulate", broken)
    p = _prepared(toy_world, tmp_path, method={"name": "ga_kl"})
    plan = plan_memory(p, device_memory=80 * GIB)
    assert plan["fits"] is None and "aten::exotic" in plan["incomplete"] and plan["verdict"].startswith("unknown")
    assert plan["terms"]["weights"] > 0 and plan["terms"]["activations, logits, loss terms"] == 0
    assert not plan_memory(p, device_memory=plan["terms"]["weights"])["fits"]  # a lower bound can still not fit


def test_the_loop_frees_each_micro_steps_logits_before_the_optimizer_step(toy_world, tmp_path, monkeypatch):
    """The plan never counts a previous micro-step's logits; the loop must not keep them (it once held them through
    the next forward, the backward and the optimizer step: benchmarks/RESULTS.md section 10)."""
    import weakref
    from dsunlearn import engine as E
    from dsunlearn import loop
    alive, checks = [], []

    def check(where):
        checks.append((where, sum(r() is not None for r in alive)))

    real_forward, real_build = loop.fused_forward, E.build_train_engine

    def fused_forward(*a, **k):
        check("next forward")
        outputs = real_forward(*a, **k)
        alive.extend(weakref.ref(o.logits) for o in outputs.values())
        return outputs

    def build_train_engine(*a, **k):
        engine = real_build(*a, **k)
        step = engine.step
        engine.step = lambda *sa, **sk: check("optimizer step") or step(*sa, **sk)
        return engine
    monkeypatch.setattr(loop, "fused_forward", fused_forward)
    monkeypatch.setattr(E, "build_train_engine", build_train_engine)
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run", method={"name": "ga_gd"},
                           train={"num_steps": 2, "grad_accum": 2}, eval={"splits": []})
    assert loop.unlearn(load_run_config(str(cfg)), CPU_ZERO3) == 0
    assert [w for w, _ in checks] == ["next forward", "optimizer step"] * 4
    assert all(n == 0 for _, n in checks), checks


def test_evaluation_and_the_relearn_audit_are_phases_of_their_own(toy_world, tmp_path):
    """Evaluations (no-grad forwards at eval.micro_batch_size) and the relearning audit (a full fine-tune of the
    exported model on audit.relearn_batch_size chunks) can peak higher than the unlearning steps."""
    from dsunlearn.memory import _peak_transient, eval_pass
    p = _prepared(toy_world, tmp_path, method={"name": "ga_gd"}, eval={"splits": []})
    assert "evaluation" not in plan_memory(p)["phases"]
    p = _prepared(toy_world, tmp_path, method={"name": "ga_gd"}, eval={"splits": ["forget", "approximate"],
                                                                      "micro_batch_size": 16})
    plan = plan_memory(p)
    planned = simulate(p, False, "none")["eval_pass"]
    model = planned_model(p).to_empty(device="cpu").eval()  # the same pass on real tensors
    real = _peak_transient(lambda _: eval_pass(model, 16, p.cfg.data.seq_len))
    assert planned == pytest.approx(real, rel=0.05) and planned > 16 * p.cfg.data.seq_len * p.model_config.vocab_size
    assert plan["phases"]["evaluation"] > plan["phases"]["optimizer step"]

    audited = dict(method={"name": "ga_gd"}, eval={"audits": ["relearn"]}, adapter={"rank": 4})
    small = plan_memory(_prepared(toy_world, tmp_path, audit={"relearn_batch_size": 2}, **audited))
    big = plan_memory(_prepared(toy_world, tmp_path, audit={"relearn_batch_size": 32}, **audited))
    # The audit fine-tunes every weight even after a LoRA run: its model states exceed the run's.
    assert small["phases"]["relearn audit"] > small["phases"]["optimizer step"]
    assert big["phases"]["relearn audit"] > small["phases"]["relearn audit"] and big["peak_phase"] == "relearn audit"
    tight = plan_memory(_prepared(toy_world, tmp_path, audit={"relearn_batch_size": 32}, **audited),
                        device_memory=int(small["peak_bytes"] / (1 - HEADROOM)) + 2**20)
    assert not tight["fits"] and tight["first_knob"].startswith("set audit.relearn_batch_size to 1")


def test_the_twin_scored_before_training_is_freed_before_training(toy_world, tmp_path, monkeypatch):
    """The retrained twin is a frozen engine scored once at the start; DeepSpeed's hooks and module stack kept its
    weight partitions alive through the whole run until ``engine.release_engine`` (measured: a whole fp32 partition
    per rank)."""
    import weakref
    from dsunlearn import loop
    from dsunlearn.eval import runner
    partitions, alive_at_step = [], []
    real_load, real_step = runner.load_frozen, loop.train_step

    def load_frozen(*a, **k):
        engine, handle = real_load(*a, **k)
        partitions.extend(weakref.ref(q.ds_tensor) for q in engine.module.parameters())
        return engine, handle

    def train_step(run, step):
        import gc
        gc.collect()
        alive_at_step.append(sum(r() is not None for r in partitions))
        return real_step(run, step)
    monkeypatch.setattr(runner, "load_frozen", load_frozen)
    monkeypatch.setattr(loop, "train_step", train_step)
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run", method={"name": "ga_gd"},
                           train={"num_steps": 1}, eval={"retrained_model": toy_world["model"], "max_chunks": 4,
                                                         "split_check": False})
    assert loop.unlearn(load_run_config(str(cfg)), CPU_ZERO3) == 0
    assert partitions and alive_at_step == [0]


def test_the_relearn_audits_evaluations_are_a_phase_of_their_own(toy_world, tmp_path):
    """The relearning audit scores its splits after every fine-tune step at eval.micro_batch_size, on its train engine
    (every weight trained, optimizer states allocated). After a LoRA run that peaks above anything the run itself
    does, and the fit check must say so: a device between the run's peak and the audit's was once called a fit."""
    audited = dict(method={"name": "ga_gd"}, adapter={"rank": 4}, audit={"relearn_batch_size": 1},
                   eval={"audits": ["relearn"], "micro_batch_size": 64})
    p = _prepared(toy_world, tmp_path, **audited)
    plan = plan_memory(p)
    phases = plan["phases"]
    assert plan["peak_phase"] == "relearn audit evaluation" and plan["peak_bytes"] == phases["relearn audit evaluation"]
    run_peak = max(v for k, v in phases.items() if not k.startswith("relearn audit"))
    assert phases["relearn audit evaluation"] > max(run_peak, phases["relearn audit"])
    # The evaluation phase of a full fine-tune of the same model (no theta_0, no twin): the same machinery.
    full = plan_memory(_prepared(toy_world, tmp_path, method={"name": "ga_gd"}, eval={"micro_batch_size": 64}))
    assert phases["relearn audit evaluation"] == full["phases"]["evaluation"]

    tight = plan_memory(p, device_memory=int((run_peak + plan["peak_bytes"]) / 2 / (1 - HEADROOM)))
    assert not tight["fits"] and tight["knob_fits"] and tight["first_knob"] == "set eval.micro_batch_size to 1"
    one = plan_memory(_prepared(toy_world, tmp_path, **{**audited, "eval": {"audits": ["relearn"],
                                                                            "micro_batch_size": 1}}))
    assert tight["peak_after_knob"] == one["peak_bytes"] < tight["budget_bytes"]
