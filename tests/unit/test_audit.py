"""The relearning and quantization audits (dsunlearn/eval/audit.py): the quantization grid, the document split, the
relearning decision, and `dsunlearn audit` end to end on the toy world (one process)."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest
import torch

from dsunlearn.cli import main
from dsunlearn.eval.audit import (quantization_group, quantize_dequantize, quantize_linear_weights_, relearn_outcome,
                                  split_forget_documents)
from helpers import CPU_ZERO3, write_run_config


# ---------------------------------------------------------------------------------------------------------------------
# Quantization

@pytest.mark.parametrize("bits", [8, 4, 3])
def test_quantized_weights_are_on_the_grid_and_within_half_a_step(bits):
    torch.manual_seed(bits)
    weight = torch.randn(24, 96) * torch.linspace(0.01, 2.0, 96)  # groups with very different ranges
    q = quantize_dequantize(weight, bits, group_size=32)
    assert q.shape == weight.shape and q.dtype == weight.dtype
    for g in range(3):
        w, wq = weight[:, 32 * g:32 * (g + 1)], q[:, 32 * g:32 * (g + 1)]
        for row_w, row_q in zip(w, wq):
            step = row_w.abs().max() / ((2 ** bits - 1) / 2)  # symmetric grid: 2^bits levels over [-max, max]
            assert (row_q - row_w).abs().max() <= step / 2 * (1 + 1e-3)  # fp32 scale arithmetic
            levels = torch.round(row_q / step)
            assert torch.allclose(levels * step, row_q, atol=1e-3 * float(step))  # every value is a grid point
            assert levels.unique().numel() <= 2 ** bits
    assert not torch.equal(q, weight)


def round_to_nearest(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The symmetric grid by hand: one scale max|w_group| / ((2^bits - 1) / 2) per ``group`` inputs."""
    w = weight.reshape(weight.shape[0], -1, group)
    scale = w.abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2)
    levels = torch.clamp(torch.round(w / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return (levels * scale).reshape(weight.shape)


def assert_grouped_by(q: torch.Tensor, weight: torch.Tensor, bits: int, group: int) -> None:
    """``q`` is ``weight`` on the grid of ``group`` inputs per scale. A weight exactly halfway between two levels (the
    largest negative one of a group sits at -(2^bits - 1) / 2 steps) may round either way in fp32."""
    w = weight.reshape(weight.shape[0], -1, group)
    step = (w.abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2)).expand_as(w).reshape(weight.shape)
    diff = (q - round_to_nearest(weight, bits, group)).abs()
    tie = ((weight / step).abs() % 1 - 0.5).abs() < 1e-4
    assert ((diff < 1e-5) | (tie & (diff < step * (1 + 1e-4)))).all()


def test_a_group_size_that_does_not_divide_the_width_gives_one_scale_per_row():
    torch.manual_seed(0)
    weight = torch.randn(4, 96)
    weight[:, :32] *= 100  # one scale per row shares this range with the other 64 columns
    assert quantization_group(96, 64) == 96 and quantization_group(96, 32) == 32 and quantization_group(64, 128) == 64
    q = quantize_dequantize(weight, 4, group_size=64)  # 96 % 64 != 0: per row, not gcd(96, 64) = 32
    assert_grouped_by(q, weight, 4, 96)
    assert not torch.allclose(q, quantize_dequantize(weight, 4, group_size=32))


@pytest.mark.parametrize("width", [51, 97])
def test_an_odd_width_is_quantized_per_row(width):
    # gcd(odd, 128) = 1: a group of one weight, which torchao refuses.
    torch.manual_seed(width)
    weight = torch.randn(6, width)
    assert quantization_group(width, 128) == width
    q = quantize_dequantize(weight, 4, group_size=128)
    assert_grouped_by(q, weight, 4, width)


def test_width_50_with_group_128_is_quantized_per_row_with_a_per_row_error():
    torch.manual_seed(50)
    weight = torch.randn(64, 50)
    assert quantization_group(50, 128) == 50  # not gcd(50, 128) = 2
    q = quantize_dequantize(weight, 4, group_size=128)
    assert_grouped_by(q, weight, 4, 50)
    # The error a 4-bit grid over a whole row implies: at most half a step of max|w_row| / 7.5, a quarter of one on
    # average (uniform rounding). Groups of 2 (gcd(50, 128)) give each pair its own, smaller step: 0.17 of a row step.
    step = weight.abs().amax(1, keepdim=True) / 7.5
    error = (q - weight).abs()
    assert (error <= step / 2 * (1 + 1e-3)).all()
    assert 0.24 < float((error / step).mean()) < 0.27
    assert float(((round_to_nearest(weight, 4, 2) - weight).abs() / step).mean()) < 0.18


def test_group_size_one_is_refused():
    with pytest.raises(ValueError, match=">= 2"):
        quantize_dequantize(torch.randn(4, 8), 4, group_size=1)


def test_every_linear_layer_is_quantized_once_tied_weights_included():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    # q, k, v, o, gate, up, down per layer + lm_head (tied), every width a multiple of 32.
    assert quantize_linear_weights_(llama, 4, 32) == {32: 2 * 7 + 1}
    after = llama.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], after["lm_head.weight"])  # still tied
    assert torch.equal(after["lm_head.weight"], quantize_dequantize(before["lm_head.weight"], 4, 32))
    assert torch.equal(after["model.layers.0.mlp.down_proj.weight"],
                       quantize_dequantize(before["model.layers.0.mlp.down_proj.weight"], 4, 32))
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # norms are not linear layers
    # GPT-2's Conv1D stores [in, out]: grouped along its inputs like a Linear's.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    w = gpt2.transformer.h[0].mlp.c_fc.weight.detach().clone()  # [32, 128]
    # c_attn, c_proj, c_fc (32 inputs), lm_head (tied) grouped by 32; mlp.c_proj (128 inputs) by 32 too.
    assert quantize_linear_weights_(gpt2, 4, 32) == {32: 5}
    assert torch.equal(gpt2.transformer.h[0].mlp.c_fc.weight, quantize_dequantize(w.t(), 4, 32).t())
    w = gpt2.transformer.h[0].attn.c_attn.weight.detach().clone()
    assert quantize_linear_weights_(gpt2, 4, 48) == {32: 4, 128: 1}  # neither width divisible by 48: per row
    assert torch.equal(gpt2.transformer.h[0].attn.c_attn.weight, quantize_dequantize(w.t(), 4, 48).t())


# ---------------------------------------------------------------------------------------------------------------------
# Relearning: the split and the decision

def test_forget_split_is_by_document_seeded_and_complete():
    doc_index = [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6, 7, 7]
    train, held = split_forget_documents(doc_index, 0.5, seed=0)
    assert sorted(train + held) == list(range(len(doc_index)))
    train_docs, held_docs = {doc_index[i] for i in train}, {doc_index[i] for i in held}
    assert not train_docs & held_docs and len(train_docs) == 4
    assert split_forget_documents(doc_index, 0.5, seed=0) == (train, held)
    assert split_forget_documents(doc_index, 0.5, seed=1) != (train, held)
    assert len({doc_index[i] for i in split_forget_documents(doc_index, 0.99, seed=0)[1]}) == 1  # one kept out
    with pytest.raises(ValueError, match="at least two"):
        split_forget_documents([3, 3, 3], 0.5, seed=0)


def test_relearning_fails_only_when_the_model_relearns_faster_than_the_baseline():
    # Original 2.0, baseline starts at 4.0: relearned at 2.0 + 0.5 * 2.0 = 3.0.
    twin = [4.0, 3.8, 3.5, 3.2, 3.0, 2.9]
    threshold, model_steps, twin_steps, failed = relearn_outcome([4.0, 3.4, 2.9, 2.5, 2.4, 2.3], twin, 2.0, 0.5)
    assert (threshold, model_steps, twin_steps, failed) == (3.0, 2, 4, True)
    assert relearn_outcome([4.1, 3.9, 3.6, 3.3, 3.1, 3.0], twin, 2.0, 0.5)[1:] == (5, 4, False)  # slower than the twin
    assert relearn_outcome([4.1, 4.0, 3.9, 3.9, 3.8, 3.8], twin, 2.0, 0.5)[1:] == (None, 4, False)  # never
    assert relearn_outcome([3.5, 3.4, 3.0, 2.9, 2.8, 2.7], [4.0] * 6, 2.0, 0.5)[1:] == (2, None, True)  # twin never
    assert relearn_outcome([2.1] * 6, twin, 2.0, 0.5)[1:] == (0, 4, True)  # never unlearned: fails at step 0


# ---------------------------------------------------------------------------------------------------------------------
# `dsunlearn audit` end to end, one process

def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def audited(toy_world, tmp_path_factory):
    """The toy model audited against a 'twin' (another tiny model of the same tokenizer: the mechanics, not the
    figures, are under test)."""
    from transformers import AutoTokenizer
    from dsunlearn.toy import make_tiny_llama
    root = tmp_path_factory.mktemp("audit")
    twin = make_tiny_llama(str(root / "twin"), AutoTokenizer.from_pretrained(toy_world["model"]), seed=1)
    # max_chunks 24 < the 32 held-out forget chunks; group 64 does not divide down_proj's 160 inputs.
    cfg = write_run_config(root / "run.json", toy_world, root / "unused", eval={"micro_batch_size": 8,
                                                                                "max_chunks": 24},
                           audit={"relearn_steps": 3, "relearn_batch_size": 4, "quantize_bits": [8, 4],
                                  "quantize_group_size": 64})
    model_before, twin_before = _digest(Path(toy_world["model"])), _digest(Path(twin))
    out = root / "out"
    code = main(["audit", "--config", str(cfg), "--zero", CPU_ZERO3, "--model", toy_world["model"], "--twin", twin,
                 "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    return {"code": code, "metrics": metrics, "out": out, "twin": twin, "model_before": model_before,
            "twin_before": twin_before, "model": toy_world["model"], "config": cfg, "root": root}


def test_audit_leaves_the_model_and_twin_files_untouched(audited):
    assert _digest(Path(audited["model"])) == audited["model_before"]
    assert _digest(Path(audited["twin"])) == audited["twin_before"]


def test_model_and_twin_fine_tune_on_the_same_batches_from_the_forget_slice(audited, toy_world):
    from transformers import AutoTokenizer
    from dsunlearn.config import load_run_config
    from dsunlearn.data import load_stream
    r = audited["metrics"]["audits"]["relearn"]
    model, twin = r["model"]["batches"], r["baseline_curve"]["batches"]
    assert len(model) == 3 and all(len(b) == 4 for b in model)
    assert model == twin
    cfg = load_run_config(str(audited["config"]))
    forget = load_stream("forget", toy_world["forget"], cfg.data, AutoTokenizer.from_pretrained(toy_world["model"]))
    train, held = split_forget_documents(list(forget.chunks["doc_index"]), 0.5, cfg.train.seed)
    assert {i for b in model for i in b} <= set(train)
    held_docs = {forget.chunks[i]["doc_index"] for i in held}
    assert not {forget.chunks[i]["doc_index"] for b in model for i in b} & held_docs
    # The curve: one point before the fine-tune and one per step; the weights really moved.
    points = r["model"]["points"]
    assert [q["step"] for q in points] == [0, 1, 2, 3]
    assert points[0]["train_loss"] is None and all(q["train_loss"] > 0 for q in points[1:])
    assert points[-1]["losses"]["forget"] != points[0]["losses"]["forget"]
    assert r["baseline"] == "twin" and r["baseline_split"] == "forget"


def test_relearning_says_how_many_chunks_it_scored(audited, toy_world):
    from transformers import AutoTokenizer
    from dsunlearn.config import load_run_config
    from dsunlearn.data import load_stream
    cfg = load_run_config(str(audited["config"]))
    forget = load_stream("forget", toy_world["forget"], cfg.data, AutoTokenizer.from_pretrained(toy_world["model"]))
    _, held = split_forget_documents(list(forget.chunks["doc_index"]), 0.5, cfg.train.seed)
    assert len(held) > cfg.eval.max_chunks == 24
    r = audited["metrics"]["audits"]["relearn"]
    assert r["measured_chunks"] == {"forget": 24, "approximate": 24} and r["held_out_chunks"] == len(held)
    assert f"measured on 24 of the other {len(held)} chunks (eval.max_chunks)" in r["data"]
    assert r["data"] in (audited["out"] / "report.md").read_text()


def test_audit_writes_metrics_report_and_plot(audited):
    m, out = audited["metrics"], audited["out"]
    assert m["schema_version"] == 3
    audits = m["audits"]
    assert set(audits) >= {"relearn", "quantize", "failures"}
    q = audits["quantize"]
    assert [row["bits"] for row in q["rows"]] == ["full", "8", "4"]
    assert q["rows"][0]["auc_change"] == 0 and "twin_strongest_auc" in q["rows"][0]
    assert set(q["model"]) == {"full", "8", "4"} and set(q["twin"]) == {"full", "8", "4"}
    # The toy Llama: q, k, v, o, gate, up (64 inputs) x 2 layers + the tied lm_head in groups of 64; down_proj (160
    # inputs, which 64 does not divide) one scale per row.
    assert q["group_size"] == 64 and q["groups"] == q["twin_groups"] == {"64": 13, "160": 2}
    # 8-bit moves the forget loss less than 4-bit does (both quantize the same random weights).
    assert abs(q["rows"][1]["loss_change"]["forget"]) < abs(q["rows"][2]["loss_change"]["forget"])
    report = (out / "report.md").read_text()
    assert "### Relearning" in report and "### Quantization" in report and (out / "plots" / "relearn.png").is_file()
    assert ("- one scale per 64 inputs: 13 matrices; one scale per row where 64 does not divide the width: 2 matrices "
            "160 wide\n") in report
    assert audited["code"] == (1 if audits["failures"] else 0)
    for line in audits["failures"]:  # a failure is said in the report's first lines
        assert line in "\n".join(report.splitlines()[:5])


@pytest.mark.parametrize("args, fragment", [
    (["--audits", "relearn,bogus"], "--audits"),
    (["--set", "audit.quantize_bits=[9]"], "audit.quantize_bits"),
    (["--set", "audit.quantize_group_size=1"], "audit.quantize_group_size"),
    (["--set", "audit.relearn_data=/nonexistent.jsonl"], "audit.relearn_data"),
    (["--set", "audit.relearn_fraction=1.0"], "audit.relearn_fraction"),
    (["--set", "data.approximate=null"], "data.approximate"),
])
def test_bad_audit_input_is_one_line_and_exit_2(audited, tmp_path, capsys, args, fragment):
    out = tmp_path / "out"
    code = main(["audit", "--config", str(audited["config"]), "--zero", CPU_ZERO3, "--model", audited["model"],
                 "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_frozen_engine_is_freed_when_its_block_ends_also_by_an_exception(toy_world, tmp_path):
    """``runner.frozen_engine``, used wherever a model is loaded to be scored once (the twin and a chain's original
    inside ``unlearn``, every audit load): its weight partitions are gone when the block ends, with no garbage
    collection by the caller, and the name bound by ``as`` cannot keep them alive."""
    import weakref
    from dsunlearn import engine as E
    from dsunlearn.config import load_run_config
    from dsunlearn.eval.runner import EvalSplit, evaluate_model, frozen_engine
    from dsunlearn.zero import resolve_configs
    cfg = load_run_config(str(write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run")))
    E.init_distributed()
    ds_config = resolve_configs(cfg, CPU_ZERO3, 1)
    splits = {"forget": EvalSplit("forget", [[5, 6, 7, 8, 9]] * 2, ["a b c"] * 2)}
    for fail in (False, True):
        partitions = []
        with pytest.raises(RuntimeError, match="scoring failed") if fail else contextlib.nullcontext():
            with frozen_engine(cfg, ds_config, toy_world["model"]) as frozen:
                partitions = [weakref.ref(q.ds_tensor) for q in frozen.module.parameters()]
                assert evaluate_model(frozen, splits, cfg, pad_id=0)["splits"]["forget"]["loss"] > 0
                if fail:
                    raise RuntimeError("scoring failed")
        assert partitions and all(ref() is None for ref in partitions), fail
        with pytest.raises(ReferenceError):
            frozen.module


def test_unlearn_runs_the_audits_on_its_exported_model(toy_world, tmp_path):
    from dsunlearn.config import load_run_config
    from dsunlearn.loop import unlearn
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run", train={"num_steps": 2},
                           eval={"audits": ["relearn", "quantize"], "micro_batch_size": 8},
                           audit={"relearn_steps": 2, "relearn_batch_size": 2, "quantize_bits": [4],
                                  "quantize_group_size": 32})
    assert unlearn(load_run_config(str(cfg)), CPU_ZERO3) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    audits = metrics["audits"]
    assert audits["model"] == str(tmp_path / "run" / "model") and audits["twin"] is None
    assert audits["relearn"]["baseline"] == "original on approximate"
    assert [row["bits"] for row in audits["quantize"]["rows"]] == ["full", "4"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Audits" in report and (tmp_path / "run" / "plots" / "relearn.png").is_file()
    head = "\n".join(report.splitlines()[:2 + len(audits["failures"])])
    assert all(line in head for line in audits["failures"])  # a failed audit comes first, before the verdict
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["errors"] == []


def test_a_failed_audit_leads_the_report_even_when_the_verdict_says_forgotten(audited, tmp_path):
    from dsunlearn.eval.report import write_report
    audits = json.loads(json.dumps(audited["metrics"]["audits"]))
    audits["relearn"]["failed"], audits["quantize"]["failed"] = True, False
    audits["failures"] = [f"the relearn audit fails: {audits['relearn']['finding']}"]
    metrics = {"method": "ga", "model": "m", "steps": 3, "exported_step": 3, "stop_reason": None,
               "verdict": "forgotten: every criterion holds", "judgement": {"ok": True}, "distance_to_retraining": {},
               "after": {}, "stop_target": "original_approximate", "history": [], "audits": audits}
    after = {"splits": {"forget": {"loss": 5.0, "accuracy": 0.1}}, "chunk_loss": {}}
    lines = write_report(tmp_path, metrics, after, None, None).read_text().splitlines()
    assert lines[2] == f"- **{audits['failures'][0]}** (the verdict below says forgotten; it did not last)"
    assert any(line.startswith("- **verdict: forgotten") for line in lines[3:8])
    assert "### Relearning: FAILED" in lines and "### Quantization: passed" in lines


def test_the_relearn_fine_tune_frees_its_logits_before_each_evaluation(audited, monkeypatch, tmp_path):
    """Each fine-tune step's [B, T, V] logits are gone when the held-out set is scored after it (they were kept
    alive through that evaluation: 62.5 MiB at 512 tokens x 32k vocabulary, benchmarks/RESULTS.md section 10)."""
    import weakref
    from dsunlearn.eval import audit
    trained, alive_at_eval = [], []
    real_forward, real_evaluate = audit.E.forward, audit.evaluate_model

    def forward(engine, batch, **k):
        out = real_forward(engine, batch, **k)
        if engine.training:
            trained.append(weakref.ref(out.logits))
        return out

    def evaluate_model(*a, **k):
        alive_at_eval.append(sum(r() is not None for r in trained))
        return real_evaluate(*a, **k)
    monkeypatch.setattr(audit.E, "forward", forward)
    monkeypatch.setattr(audit, "evaluate_model", evaluate_model)
    assert main(["audit", "--config", str(audited["config"]), "--zero", CPU_ZERO3, "--model", audited["model"],
                 "--twin", audited["twin"], "--out", str(tmp_path / "out"), "--audits", "relearn"]) in (0, 1)
    assert trained and alive_at_eval and not any(alive_at_eval), alive_at_eval


def test_relearning_at_several_rates_reports_each_and_the_worst_decides(audited, tmp_path):
    """audit.relearn_lr as a list: the model and the baseline are fine-tuned at each rate on the same batches; every
    rate is in metrics.json and the report, and the headline (lr, steps, failed) is the rate where the model
    relearns soonest against the baseline (UNDO's worst case over rates)."""
    from dsunlearn.config import ConfigError, load_run_config
    rates = [1e-4, 3e-3]
    out = tmp_path / "out"
    code = main(["audit", "--config", str(audited["config"]), "--zero", CPU_ZERO3, "--model", audited["model"],
                 "--twin", audited["twin"], "--out", str(out), "--audits", "relearn",
                 "--set", f"audit.relearn_lr={json.dumps(rates)}"])
    r = json.loads((out / "metrics.json").read_text())["audits"]["relearn"]
    assert [x["lr"] for x in r["rates"]] == rates and r["lr"] in rates
    never = r["steps"] + 1
    margin = lambda x: (never if x["baseline_steps_to_relearn"] is None else x["baseline_steps_to_relearn"]) - (  # noqa: E731
        never if x["model_steps_to_relearn"] is None else x["model_steps_to_relearn"])
    worst = max(r["rates"], key=lambda x: (x["failed"], margin(x)))
    assert r["lr"] == worst["lr"] and r["failed"] == any(x["failed"] for x in r["rates"])
    assert r["model_steps_to_relearn"] == worst["model_steps_to_relearn"] and code == (1 if r["failed"] else 0)
    assert r["finding"].startswith(f"at lr {worst['lr']:g}, the worst of 2 rates")
    report = (out / "report.md").read_text()
    assert "| lr | steps to relearn |" in report and "(worst)" in report
    single = load_run_config(str(audited["config"]), ["audit.relearn_lr=0.001"])
    assert single.audit.relearn_lr == 0.001
    for bad in ("[]", "[0.001, -1]", '"fast"'):
        with pytest.raises(ConfigError, match="audit.relearn_lr"):
            load_run_config(str(audited["config"]), [f"audit.relearn_lr={bad}"])
