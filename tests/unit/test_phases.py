"""Methods in phases (methods/phased.py, dsunlearn/phases.py): the tensor math against hand computations, and each
phased method run end to end on the toy world (one process, ZeRO-3 over gloo), its boundaries checked by hand."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsunlearn.config import ConfigError, MethodConfig
from dsunlearn.methods import build_method
from dsunlearn.methods.phased import (forget_specific_tokens, forget_token_ratio, mean_rows, negate, noised,
                                      tensor_seed)


def test_token_ratio_and_selection_by_hand():
    forget = torch.tensor([4, 0, 2, 2, 0])   # 8 forget tokens
    retain = torch.tensor([0, 10, 4, 1, 5])  # 20 retain tokens
    # token 0: (4/8) / ((0+1)/20) = 10; token 2: (2/8) / (5/20) = 1; token 3: (2/8) / (2/20) = 2.5
    assert torch.allclose(forget_token_ratio(forget, retain),
                          torch.tensor([10.0, 0.0, 1.0, 2.5, 0.0], dtype=torch.float64))
    assert forget_specific_tokens(forget, retain, 3.0).tolist() == [True, False, False, False, False]
    assert forget_specific_tokens(forget, retain, 2.5).tolist() == [True, False, False, True, False]
    # a token absent from the forget text is never selected, however rare in retain
    assert not forget_specific_tokens(torch.tensor([1, 0]), torch.tensor([0, 0]), 1.5)[1]


def test_null_lift_and_null_samples_by_hand():
    """The null: the selection's share of the forget tokens over the mean share the same rule selects in random
    retain samples of the forget set's size; the samples are whole retain documents, seeded."""
    from datasets import Dataset
    from dsunlearn.methods.phased import EditContext
    from dsunlearn.methods.token_rows import null_lift
    from dsunlearn.phases import chunk_counts, null_counts
    forget, retain = torch.tensor([4, 0, 2, 2, 0]), torch.tensor([0, 10, 4, 1, 5])
    # At tau 2.5 the forget selection is tokens 0 and 3: (4 + 2) / 8 of the forget tokens.
    # Draw a: token 4 is (3/3) / ((2+1)/17) = 5.7, selected: all 3 of 3. Draw b: token 3 is (1/5) / ((0+1)/15) = 3,
    # selected; token 4 (2/5) / ((3+1)/15) = 1.5 and the others are below: 1 of 5.
    draw_a = (torch.tensor([0, 0, 0, 0, 3]), torch.tensor([0, 10, 4, 1, 2]))
    draw_b = (torch.tensor([0, 1, 1, 1, 2]), torch.tensor([0, 9, 3, 0, 3]))
    ctx = EditContext(token_counts={"forget": forget, "retain": retain}, embedding="e", init_std=0.02, seed=0,
                      null_counts=(draw_a, draw_b))
    got = null_lift(ctx, 2.5)
    assert got["forget_token_share"] == 0.75 and got["null_token_share"] == pytest.approx((1 + 1 / 5) / 2)
    assert got["lift"] == pytest.approx(0.75 / 0.6) and got["null_draws"] == 2
    small = (torch.tensor([0, 0, 0, 0, 3]), torch.tensor([0, 1, 0, 0, 1]))  # its rest is smaller than the sample
    ctx = EditContext(token_counts=ctx.token_counts, embedding="e", init_std=0.02, seed=0, null_counts=(small,))
    got = null_lift(ctx, 2.5)
    assert got["null_token_share"] is None and got["lift"] is None and got["null"].startswith("not measured")
    # Documents 0 (two chunks: 4 tokens), 1 (4 tokens), 2 (3 tokens): a sample of >= 4 tokens is one whole document
    # or, when document 2 comes first, documents 2 and the next.
    chunks = Dataset.from_dict({"input_ids": [[1, 1, 2], [3], [4, 4, 4, 4], [2, 1], [0]],
                                "doc_index": [0, 0, 1, 2, 2]})
    total = chunk_counts(chunks, 5)
    assert total.tolist() == [1, 3, 2, 1, 4]
    of_doc = [chunk_counts(chunks.select(i), 5) for i in ([0, 1], [2], [3, 4])]
    draws = null_counts(chunks, 4, total, draws=8, seed=7, vocab=5)
    for sample, rest in draws:
        assert torch.equal(sample + rest, total)
        whole = [d for d in range(3) if torch.equal(torch.minimum(sample, of_doc[d]), of_doc[d])]
        assert torch.equal(sample, sum(of_doc[d] for d in whole))  # whole documents only
        assert 4 <= int(sample.sum()) and (len(whole) == 1 or 2 in whole)  # just enough
    assert [d[0].tolist() for d in draws] == [d[0].tolist() for d in null_counts(chunks, 4, total, 8, 7, 5)]


def test_token_rows_go_to_the_base_model_rows_or_the_mean_row():
    from dsunlearn.methods.phased import EditContext
    from dsunlearn.methods.token_rows import edit_token_rows
    counts = {"forget": torch.tensor([4, 0, 2, 2, 0]), "retain": torch.tensor([0, 10, 4, 1, 5])}  # tau 2.5: 0, 3
    emb, base = torch.arange(10.0).reshape(5, 2), -torch.arange(10.0).reshape(5, 2)
    ctx = EditContext(token_counts=counts, embedding="e", init_std=0.02, seed=0)
    mean = [14 / 3, 17 / 3]  # rows 1, 2 and 4
    assert torch.allclose(edit_token_rows("e", emb, ctx, 2.5), torch.tensor([mean, [2, 3], [4, 5], mean, [8, 9]]))
    assert ctx.notes == {"rows_selected": 2, "rows_to": "mean row"}
    ctx = EditContext(token_counts=counts, embedding="e", init_std=0.02, seed=0, base_embedding=base)
    assert edit_token_rows("e", emb, ctx, 2.5).tolist() == [[-0.0, -1.0], [2, 3], [4, 5], [-6, -7], [8, 9]]
    assert ctx.notes == {"rows_selected": 2, "rows_to": "base model"} and emb[0].tolist() == [0.0, 1.0]
    assert edit_token_rows("other", emb, ctx, 2.5) is None  # only the input embedding
    short = EditContext(token_counts=counts, embedding="e", init_std=0.02, seed=0, base_embedding=base[:4])
    with pytest.raises(ConfigError, match=r"eval.base_model: its input embedding is \(4, 2\), the model's \(5, 2\)"):
        edit_token_rows("e", emb, short, 2.5)


def test_mean_rows_negate_and_noise_by_hand():
    emb = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    out = mean_rows(emb, torch.tensor([True, False, False]))
    assert out.tolist() == [[4.0, 6.5], [3.0, 4.0], [5.0, 9.0]] and emb[0].tolist() == [1.0, 2.0]
    assert torch.equal(mean_rows(emb, torch.zeros(3, dtype=torch.bool)), emb)
    base, moved = torch.tensor([1.0, -2.0]), torch.tensor([1.5, -1.0])
    assert negate(base, moved, 2.0).tolist() == [0.0, -4.0]  # 1 - 2 * 0.5, -2 - 2 * 1
    w = torch.full((3, 2), 2.0)
    assert torch.equal(noised("a.weight", w, 0.0, 1.0, 0.02, 0), w)
    g = torch.Generator().manual_seed(tensor_seed(7, "a.weight"))
    fresh = torch.randn((3, 2), generator=g) * 0.02
    assert torch.allclose(noised("a.weight", w, 0.25, 2.0, 0.02, 7), 0.75 * w + 0.5 * fresh)
    assert torch.equal(noised("a.weight", w, 0.25, 2.0, 0.02, 7), noised("a.weight", w, 0.25, 2.0, 0.02, 7))
    assert not torch.equal(noised("b.weight", w, 0.25, 2.0, 0.02, 7), noised("a.weight", w, 0.25, 2.0, 0.02, 7))
    norm = torch.full((2,), 3.0)
    assert torch.allclose(noised("layers.0.input_layernorm.weight", norm, 0.5, 1.0, 0.02, 0), torch.full((2,), 2.0))
    assert torch.allclose(noised("lm.bias", norm, 0.5, 1.0, 0.02, 0), torch.full((2,), 1.5))


def test_distillation_of_a_teacher_into_itself_is_zero():
    from dsunlearn.methods.base import StreamOutputs
    from dsunlearn.methods.phased import Distillation
    from dsunlearn.methods.terms import reference_distribution
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    ref = reference_distribution(logits)
    from dsunlearn.methods.base import ReferenceOutputs
    out = StreamOutputs(logits=logits, labels=labels, input_ids=labels,
                        reference=ReferenceOutputs(topk_logprobs=ref[0], topk_ids=ref[1], rest_logmass=ref[2]))
    assert abs(float(Distillation().terms({"retain": out})["retain"])) < 1e-6


@pytest.mark.parametrize("name, params, message", [
    ("token_rows", {"token_threshold": 1.0}, "token_threshold: expected > 1"),
    ("task_vector", {"beta": 0}, "beta: expected > 0"),
    ("task_vector", {"fit_steps": 0}, "fit_steps: expected an integer >= 1"),
    ("undo", {"unlearn_method": "negate_repair"}, "unlearn_method: expected one of"),
    ("undo", {"alpha": 1.5}, "alpha: expected in [0, 1]"),
])
def test_bad_phase_knobs_are_refused(name, params, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_method(MethodConfig(name=name, params=params))


PHASED_METHODS = ("token_rows", "task_vector", "negate_repair", "undo")  # each run end to end below


def test_phases_of_each_method():
    from dsunlearn.methods import METHODS
    from dsunlearn.methods.phased import PhasedMethod
    assert {n for n, cls in METHODS.items() if issubclass(cls, PhasedMethod)} == set(PHASED_METHODS)
    kinds = {name: [(ph.name, ph.kind) for ph in build_method(MethodConfig(name=name)).phases()]
             for name in PHASED_METHODS}
    assert kinds["negate_repair"] == [("rows", "edit"), ("fit", "train"), ("negate", "arithmetic"), ("repair", "train")]
    assert kinds["undo"] == [("unlearn", "train"), ("noise", "edit"), ("distil", "train")]
    nr = build_method(MethodConfig(name="negate_repair"))
    assert [ph.name for ph in nr.earlier_phases()] == ["rows", "fit", "negate"] and nr.final_phase().name == "repair"
    tv = build_method(MethodConfig(name="task_vector"))
    assert [ph.name for ph in tv.earlier_phases()] == ["fit", "negate"] and tv.final_phase().num_steps == 0


def test_the_fit_rate_follows_the_run_rate_unless_set(tmp_path):
    """negate_repair's fit_lr None: 10/3 x train.lr in the fit phase's own run config; a number is kept as is."""
    from dsunlearn.config import load_run_config
    from dsunlearn.phases import phase_config
    for params, train_lr, want in (({}, 3e-4, 1e-3), ({}, 1e-5, 1e-5 * 10 / 3), ({"fit_lr": 2e-3}, 1e-5, 2e-3)):
        cfg = load_run_config(None, ["model.path=/m", f"train.lr={train_lr}"])
        fit = build_method(MethodConfig(name="negate_repair", params=params)).phases()[1]
        assert fit.name == "fit"
        assert phase_config(cfg, fit, "/m", tmp_path, {}, 1).train.lr == pytest.approx(want)


# ---- end to end on the toy world ----

def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def _run(toy_world, tmp_path, name: str, method: dict, **sections) -> Path:
    from dsunlearn.cli import main
    from helpers import CPU_ZERO3, write_run_config
    run_dir = tmp_path / name
    sections.setdefault("train", {"num_steps": 2, "micro_batch_size": 2})
    sections.setdefault("eval", {"every_n_steps": 1, "stop_tolerance": 0.1, "allow_unjudged": True})
    cfg = write_run_config(tmp_path / f"{name}.json", toy_world, run_dir, method=method, **sections)
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]) == 0
    return run_dir


def _token_counts(path: str, vocab: int, tokenizer_dir: str, seq_len: int = 64) -> torch.Tensor:
    """By hand: the toy world's documents tokenised and chunked as the run does, counted."""
    from transformers import AutoTokenizer
    from dsunlearn.data import load_documents, tokenize_and_chunk
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    chunks, _ = tokenize_and_chunk(load_documents(path, "text"), tok, seq_len, 16, True, None, source="test")
    ids = torch.tensor([t for c in chunks["input_ids"] for t in c])
    return torch.bincount(ids, minlength=vocab)


def test_token_rows_edits_exactly_the_forget_specific_rows(toy_world, tmp_path):
    run = _run(toy_world, tmp_path, "rows", {"name": "token_rows", "params": {"token_threshold": 2.0}})
    before, after = _weights(Path(toy_world["model"])), _weights(run / "model")
    emb = "model.embed_tokens.weight"
    vocab = before[emb].shape[0]
    forget_counts = _token_counts(toy_world["forget"], vocab, toy_world["model"])
    rows = forget_specific_tokens(forget_counts, _token_counts(toy_world["retain"], vocab, toy_world["model"]), 2.0)
    assert 0 < int(rows.sum()) < vocab
    want = before[emb].clone()
    want[rows] = before[emb][~rows].double().mean(0).to(want.dtype)
    assert torch.equal(after[emb], want)
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != emb)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["label"] for h in metrics["history"]] == ["before", "after phases"]
    assert metrics["exported_step"] == 0 and metrics["cost"]["phases"][0]["phase"] == "rows"
    record = json.loads((run / "phases" / "1-rows" / "phase.json").read_text())
    assert record["kind"] == "edit" and record["flops"] == 0 and record["boundary_bytes"] > 0
    notes = record["notes"]
    assert notes["rows_selected"] == int(rows.sum()) and notes["rows_to"] == "mean row"
    assert notes["forget_token_share"] == pytest.approx(float(forget_counts[rows].sum() / forget_counts.sum()),
                                                        abs=1e-4)
    assert (notes["null_token_share"] is None) == (notes["null_draws"] == 0)  # the null's math: the hand test


def test_task_vector_is_the_negated_fine_tune(toy_world, tmp_path):
    run = _run(toy_world, tmp_path, "tv", {"name": "task_vector", "params": {"fit_steps": 2, "fit_batch": 4,
                                                                             "beta": 1.5}})
    theta0, fit, result = (_weights(d) for d in (Path(toy_world["model"]), run / "phases" / "1-fit" / "model",
                                                  run / "model"))
    assert any(not torch.equal(fit[k], theta0[k]) for k in theta0)
    for k in theta0:
        assert torch.allclose(result[k], theta0[k] - 1.5 * (fit[k] - theta0[k]), atol=1e-6), k
    fit_log = [json.loads(x) for x in (run / "phases" / "1-fit" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in fit_log] == [1, 2] and {r["phase"] for r in fit_log} == {"fit"}
    cost = json.loads((run / "summary.json").read_text())["cost"]
    assert [p["phase"] for p in cost["phases"]] == ["fit", "negate"]
    assert cost["unlearning_flops"] == pytest.approx(sum(p["flops"] for p in cost["phases"]))
    assert cost["phases"][0]["flops"] > 0 and cost["phases"][1]["flops"] == 0


def test_negate_repair_repairs_from_the_negated_boundary(toy_world, tmp_path):
    # With a base model (the model before the forget set), the selected rows go back to the base's rows.
    base_dir = tmp_path / "base"
    shutil.copytree(toy_world["model"], base_dir)
    theta0 = _weights(Path(toy_world["model"]))
    emb = "model.embed_tokens.weight"
    base = dict(theta0, **{emb: theta0[emb] + 1.0})
    save_file(base, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    run = _run(toy_world, tmp_path, "nr", {"name": "negate_repair",
                                           "params": {"token_threshold": 2.0, "fit_steps": 2, "fit_batch": 4}},
               eval={"every_n_steps": 1, "stop_tolerance": 0.1, "allow_unjudged": True,
                     "base_model": str(base_dir)})
    rows, fit, negated = (_weights(run / "phases" / d / "model") for d in ("1-rows", "2-fit", "3-negate"))
    vocab = theta0[emb].shape[0]
    selected = forget_specific_tokens(_token_counts(toy_world["forget"], vocab, toy_world["model"]),
                                      _token_counts(toy_world["retain"], vocab, toy_world["model"]), 2.0)
    assert 0 < int(selected.sum()) < vocab
    assert torch.equal(rows[emb], torch.where(selected[:, None], base[emb], theta0[emb]))
    assert all(torch.equal(rows[k], v) for k, v in theta0.items() if k != emb)
    notes = json.loads((run / "phases" / "1-rows" / "phase.json").read_text())["notes"]
    assert notes["rows_to"] == "base model" and notes["rows_selected"] == int(selected.sum())
    for k in rows:  # the task vector is taken about the edited model, not theta_0
        assert torch.allclose(negated[k], rows[k] - 2.0 * (fit[k] - rows[k]), atol=1e-6), k
    metrics = json.loads((run / "metrics.json").read_text())
    labels = [h["label"] for h in metrics["history"]]
    assert labels == ["before", "after phases", "step 1", "step 2"]
    before = metrics["history"][0]["splits"]["forget"]["loss"]
    assert metrics["history"][1]["splits"]["forget"]["loss"] > before  # the original, not the boundary, is "before"
    log_rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log_rows] == ["repair", "repair"]
    cost = metrics["cost"]
    assert cost["unlearning_flops"] == pytest.approx(cost["phases"][1]["flops"] + cost["flops_per_step"]["total"] * 2)


def test_project_off_by_hand():
    from dsunlearn.methods.phased import project_off
    theta = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[2.0]])}
    origin = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[0.0]])}
    u = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[1.0]])}
    # <theta - origin, u> = 2*1 + 0*0 + 2*1 = 4; <u, u> = 2; c = 2: theta - 2u
    got = project_off(theta, origin, u)
    assert torch.equal(got["a"], torch.tensor([1.0, 1.0])) and torch.equal(got["b"], torch.tensor([[0.0]]))
    zero = {"a": torch.zeros(2), "b": torch.zeros(1, 1)}
    assert all(torch.equal(project_off(theta, origin, zero)[k], theta[k]) for k in theta)  # u = 0: unchanged


@pytest.mark.parametrize("keep_off", [False, True])
def test_negate_repair_keeps_the_repair_off_the_negation(toy_world, tmp_path, keep_off):
    """keep_off_negation: every repair step ends without a component along the negation (rows -> negated), on the
    engine's ZeRO-3 partitions. Without it the repair does move back along the negation."""
    from dsunlearn.methods.phased import project_off
    from helpers import direction_cosine
    run = _run(toy_world, tmp_path, "keep", {"name": "negate_repair", "params": {
        "token_threshold": 2.0, "fit_steps": 2, "fit_batch": 4, "keep_off_negation": keep_off}},
        train={"num_steps": 3, "micro_batch_size": 2},
        eval={"every_n_steps": 3, "stop_tolerance": 0.0, "allow_unjudged": True})
    rows, negated, out = (_weights(p) for p in (run / "phases" / "1-rows" / "model",
                                                 run / "phases" / "3-negate" / "model", run / "model"))
    assert json.loads((run / "metrics.json").read_text())["exported_step"] == 3  # the repair took its steps
    if not keep_off:
        assert abs(direction_cosine(out, negated, rows)) > 1e-3
        return
    assert abs(direction_cosine(out, negated, rows)) < 1e-5
    again = project_off(out, negated, {k: rows[k] - negated[k] for k in out})  # projecting twice changes nothing
    assert all(torch.allclose(again[k], out[k], atol=1e-6) for k in out)


def test_negate_repair_in_bf16_under_zero2(toy_world, tmp_path):
    """ds_configs/zero2.json (bf16, ZeRO-2): the fit writes a bf16 boundary after the fp32 input, the negation keeps
    that dtype, and the repair is kept off the negation on the full parameters and their fp32 masters (the residual
    is bf16 rounding of the exported weights; unconstrained it is about 0.04 here)."""
    from dsunlearn.cli import main
    from helpers import REPO, direction_cosine, write_run_config
    run = tmp_path / "z2"
    cfg = write_run_config(tmp_path / "z2.json", toy_world, run, method={"name": "negate_repair", "params": {
        "token_threshold": 2.0, "fit_steps": 2, "fit_batch": 4}}, train={"num_steps": 3, "micro_batch_size": 2},
        eval={"every_n_steps": 3, "stop_tolerance": 0.0, "allow_unjudged": True})
    assert main(["unlearn", "--config", str(cfg), "--zero", str(REPO / "ds_configs" / "zero2.json")]) == 0
    rows, negated, out = (_weights(p) for p in (run / "phases" / "1-rows" / "model",
                                                 run / "phases" / "3-negate" / "model", run / "model"))
    assert negated["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert abs(direction_cosine(out, negated, rows)) < 2e-3


def test_undo_noises_the_teacher_and_distils_from_it(toy_world, tmp_path):
    run = _run(toy_world, tmp_path, "undo", {"name": "undo", "params": {
        "unlearn_method": "ga_gd", "unlearn_steps": 2, "unlearn_batch": 2, "alpha": 0.5, "noise_beta": 1.0}})
    teacher, noisy = (_weights(run / "phases" / d / "model") for d in ("1-unlearn", "2-noise"))
    init_std = json.loads((Path(toy_world["model"]) / "config.json").read_text()).get("initializer_range", 0.02)
    for k in teacher:
        assert torch.allclose(noisy[k], noised(k, teacher[k], 0.5, 1.0, init_std, 42), atol=1e-7), k
    reference = json.loads((run / "reference.json").read_text())["reference"]
    assert reference["mode"] == "engine" and reference["streams"] == {"retain": "logits"}  # the teacher, frozen
    assert json.loads((run / "config.json").read_text())["reference"]["path"] is None  # the user's knobs kept
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"][-1]["label"] == "step 2" and not math.isnan(metrics["cost"]["unlearning_flops"])


def test_phased_runs_refuse_what_they_cannot_do(toy_world, tmp_path, capsys):
    from dsunlearn.cli import main
    from helpers import CPU_ZERO3, write_run_config
    cases = [({"name": "negate_repair"}, {"adapter": {"rank": 4}}, "adapter.rank=4: method 'negate_repair' works in "
                                                                   "phases on the full weights"),
             ({"name": "undo"}, {"reference": {"mode": "cache"}}, "reference.mode='cache': phase 'distil' distils")]
    for i, (method, sections, message) in enumerate(cases):
        cfg = write_run_config(tmp_path / f"c{i}.json", toy_world, tmp_path / f"r{i}", method=method, **sections)
        assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"r{i}").exists()  # refused before the run directory was touched


def test_dry_run_plans_every_phase(toy_world, tmp_path, capsys):
    from dsunlearn.cli import main
    from helpers import CPU_ZERO3, write_run_config
    cfg = write_run_config(tmp_path / "u.json", toy_world, tmp_path / "u", method={"name": "undo"},
                           train={"num_steps": 4, "micro_batch_size": 2})
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--dry-run", "--world-size", "2"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    rows = out["phases"]
    assert [(r["phase"], r["kind"], r["steps"]) for r in rows] == [("unlearn", "train", 30), ("noise", "edit", 0),
                                                                    ("distil", "distil", 4)]
    assert rows[0]["peak_bytes"] > 0 and rows[1]["host_bytes"] > 0 and rows[1]["peak_bytes"] is None
    assert rows[2]["peak_bytes"] == out["memory_plan"]["peak_bytes"]  # the last phase is the run's own plan
    assert out["memory_plan"]["reference_mode"] == "engine"  # the teacher: a frozen engine
    assert "phases of the method:" in captured.err and "3. distil" in captured.err
    assert not (tmp_path / "u").exists()
    # negate_repair's repair holds the kept-off direction and its origin: two fp32 copies of a rank's partition
    cfg = write_run_config(tmp_path / "n.json", toy_world, tmp_path / "n", method={"name": "negate_repair"},
                           train={"num_steps": 4, "micro_batch_size": 2})
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--dry-run", "--world-size", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["terms"]["kept-off direction and origin (keep_off)"] == 8 * plan["parameters"]["trainable"] // 2
