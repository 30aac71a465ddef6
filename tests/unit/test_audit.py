"""The relearning and quantization audits (dsunlearn/eval/audit.py): the quantization grid, the document split, the
relearning decision, and `dsunlearn audit` end to end on the toy world (one process)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dsunlearn.cli import main
from dsunlearn.eval.audit import (quantize_dequantize, quantize_linear_weights_, relearn_outcome,
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


def test_group_size_falls_back_to_the_gcd_of_the_width():
    torch.manual_seed(0)
    weight = torch.randn(4, 96)
    weight[:, :32] *= 100  # a group of 64 would share this range with the next 32 columns
    q = quantize_dequantize(weight, 4, group_size=64)  # 96 % 64 != 0: groups of gcd(96, 64) = 32
    assert torch.equal(q, quantize_dequantize(weight, 4, group_size=32))
    assert (q[:, 32:] - weight[:, 32:]).abs().max() < 0.5  # a shared range (100x) would round these to 0 or +-14


def test_every_linear_layer_is_quantized_once_tied_weights_included():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    assert quantize_linear_weights_(llama, 4, 32) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    after = llama.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], after["lm_head.weight"])  # still tied
    assert torch.equal(after["lm_head.weight"], quantize_dequantize(before["lm_head.weight"], 4, 32))
    assert torch.equal(after["model.layers.0.mlp.down_proj.weight"],
                       quantize_dequantize(before["model.layers.0.mlp.down_proj.weight"], 4, 32))
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # norms are not linear layers
    # GPT-2's Conv1D stores [in, out]: grouped along its inputs like a Linear's.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    w = gpt2.transformer.h[0].mlp.c_fc.weight.detach().clone()  # [32, 128]
    quantize_linear_weights_(gpt2, 4, 32)
    assert torch.equal(gpt2.transformer.h[0].mlp.c_fc.weight, quantize_dequantize(w.t(), 4, 32).t())


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
    cfg = write_run_config(root / "run.json", toy_world, root / "unused", eval={"micro_batch_size": 8},
                           audit={"relearn_steps": 3, "relearn_batch_size": 4, "quantize_bits": [8, 4],
                                  "quantize_group_size": 32})
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


def test_audit_writes_metrics_report_and_plot(audited):
    m, out = audited["metrics"], audited["out"]
    assert m["schema_version"] == 3
    audits = m["audits"]
    assert set(audits) >= {"relearn", "quantize", "failures"}
    q = audits["quantize"]
    assert [row["bits"] for row in q["rows"]] == ["full", "8", "4"]
    assert q["rows"][0]["auc_change"] == 0 and "twin_strongest_auc" in q["rows"][0]
    assert set(q["model"]) == {"full", "8", "4"} and set(q["twin"]) == {"full", "8", "4"}
    # 8-bit moves the forget loss less than 4-bit does (both quantize the same random weights).
    assert abs(q["rows"][1]["loss_change"]["forget"]) < abs(q["rows"][2]["loss_change"]["forget"])
    report = (out / "report.md").read_text()
    assert "### Relearning" in report and "### Quantization" in report and (out / "plots" / "relearn.png").is_file()
    assert audited["code"] == (1 if audits["failures"] else 0)
    for line in audits["failures"]:  # a failure is said in the report's first lines
        assert line in "\n".join(report.splitlines()[:5])


@pytest.mark.parametrize("args, fragment", [
    (["--audits", "relearn,bogus"], "--audits"),
    (["--set", "audit.quantize_bits=[9]"], "audit.quantize_bits"),
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
