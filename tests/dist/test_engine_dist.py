"""Real ZeRO-3 on CPU ranks over gloo: the deepspeed launcher, torchrun-free single process, and mpirun.

Few launches (each costs ~10-20 s): one 1-rank run and one 2-rank run of the same global batch feed every check.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import CPU_ZERO3, REPO, free_port, launch_env, run_cli, write_run_config, deepspeed_launcher

NUM_STEPS = 6


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
    return rows


def _losses(run_dir: Path) -> list[float]:
    return [r["loss/total"] for r in _rows(run_dir)]


def assert_same_losses(run_a: Path, run_b: Path) -> None:
    """Every term and the total agree within 1e-5 of the log-probability scale, step by step.

    Every term is built from per-token log-probabilities of about 6 nats, and fp32 rounding (~5e-7 relative) is
    relative to those, not to the term: GA+GD's total is a difference of two ~6-nat terms (about 0.02 here), and
    GA+KL's retain term is a KL of ~1e-3 nats, itself a mean of differences of ~6-nat log-probabilities. So every
    term is measured against |forget| + |retain|, the cross-entropy scale of the batch (a sharding or batching bug
    moves a term by far more than rounding does).
    """
    for step, (a, b) in enumerate(zip(_rows(run_a), _rows(run_b)), start=1):
        scale = abs(a["loss/forget"]) + abs(a["loss/retain"])
        for key in ("loss/forget", "loss/retain"):
            assert abs(a[key] - b[key]) <= 1e-5 * scale, f"step {step} {key}: {a[key]} vs {b[key]}"
        assert abs(a["loss/total"] - b["loss/total"]) <= 1e-5 * scale, \
            f"step {step} loss/total: {a['loss/total']} vs {b['loss/total']}"


@pytest.fixture(scope="module")
def runs(toy_world, tmp_path_factory):
    """Global batch of 4 forget + 4 retain chunks: 1 rank x micro 4, and 2 ranks x micro 2."""
    root = tmp_path_factory.mktemp("dist_runs")
    out = {}
    # KnowMem questions of uneven length, an odd number of them (batches of 4, 4 and 3): left padding across ranks.
    words = open(toy_world["retain"]).read().split()
    (root / "retain_qa.json").write_text(json.dumps(
        [{"question": " ".join(words[i:i + 1 + 2 * i]), "answer": words[i + 2]} for i in range(11)]))
    generation = {"generation_prompts": 12, "verbmem_tokens": 16, "knowmem_retain": str(root / "retain_qa.json"),
                  "knowmem_tokens": 6}
    one = write_run_config(root / "one.json", toy_world, root / "one",
                           train={"micro_batch_size": 4, "num_steps": NUM_STEPS, "lr": 5e-3}, eval=generation)
    p = run_cli(["unlearn", "--config", str(one), "--zero", CPU_ZERO3])
    assert p.returncode == 0, p.stderr[-3000:]
    out["one"] = root / "one"
    two = write_run_config(root / "two.json", toy_world, root / "two",
                           train={"micro_batch_size": 2, "num_steps": NUM_STEPS, "lr": 5e-3}, eval=generation)
    p = run_cli(["unlearn", "--config", str(two), "--zero", CPU_ZERO3],
                launcher=deepspeed_launcher(2))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out["two"] = root / "two"
    out["two_config"] = two
    return out


def test_two_ranks_match_one_rank(runs):
    assert_same_losses(runs["one"], runs["two"])
    resolved = json.loads((runs["two"] / "ds_config.json").read_text())
    assert resolved["train_batch_size"] == 4 and resolved["train_micro_batch_size_per_gpu"] == 2
    assert resolved["zero_optimization"]["stage"] == 3


def test_tensorboard_has_every_term_every_step(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(runs["two"] / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("loss/forget", "loss/retain", "loss/total", "lr", "grad_norm", "tokens_per_s"):
        assert tag in tags, tags
        assert [e.step for e in events.Scalars(tag)] == list(range(1, NUM_STEPS + 1))
    logged = _losses(runs["two"])
    assert [pytest.approx(e.value, rel=1e-6) for e in events.Scalars("loss/total")] == logged


def _split_nll(model, tokenizer, path: str) -> float:
    from dsunlearn.data import collate, load_documents, tokenize_and_chunk
    from dsunlearn.methods.terms import chunk_nll
    chunks, _ = tokenize_and_chunk(load_documents(path), tokenizer, 64)
    batch = collate(chunks["input_ids"], 64, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return chunk_nll(logits, batch["labels"]).mean().item()


def test_exported_model_loads_and_forgot(runs, toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    exported = runs["two"] / "model"
    assert (exported / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    after = AutoModelForCausalLM.from_pretrained(exported)
    before = AutoModelForCausalLM.from_pretrained(toy_world["model"])
    forget_delta = _split_nll(after, tokenizer, toy_world["forget"]) - _split_nll(before, tokenizer, toy_world["forget"])
    retain_delta = _split_nll(after, tokenizer, toy_world["retain"]) - _split_nll(before, tokenizer, toy_world["retain"])
    assert forget_delta > 0, forget_delta
    assert abs(retain_delta) < forget_delta, (forget_delta, retain_delta)


def test_mpirun_route_gives_the_same_losses(runs, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (make test installs Open MPI from Debian when run as root)")
    cfg = json.loads(Path(runs["two_config"]).read_text())
    cfg["output"]["run_dir"] = str(tmp_path / "mpi")
    path = tmp_path / "mpi.json"
    path.write_text(json.dumps(cfg))
    env = launch_env()
    env["MASTER_PORT"] = str(free_port())
    p = subprocess.run(["bash", str(REPO / "launchers" / "mpirun.sh"), "2", "unlearn", "--config", str(path),
                        "--zero", CPU_ZERO3], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert_same_losses(runs["two"], tmp_path / "mpi")


def _before(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["history"][0]


def test_distributed_eval_equals_single_process(runs):
    """The step-0 evaluation (the original model) through ZeRO-3: 2 ranks == 1 rank, every split and attack."""
    one, two = _before(runs["one"]), _before(runs["two"])
    assert set(one["splits"]) == {"forget", "retain", "approximate", "general"}
    for split, m in one["splits"].items():
        for key in ("loss", "accuracy"):
            assert two["splits"][split][key] == pytest.approx(m[key], rel=1e-5, abs=1e-7), (split, key)
        assert two["splits"][split]["num_tokens"] == m["num_tokens"]
    for attack, m in one["mia"].items():
        assert two["mia"][attack]["auc"] == pytest.approx(m["auc"], abs=1e-9), attack


def test_eval_matches_plain_transformers_one_chunk_at_a_time(runs, toy_world):
    """Split loss / accuracy and the LOSS-attack AUC from a plain per-chunk loop over the original model."""
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from dsunlearn.data import load_documents, tokenize_and_chunk
    model = AutoModelForCausalLM.from_pretrained(toy_world["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_world["model"])
    before = _before(runs["two"])
    per_chunk = {}
    for split in ("forget", "approximate"):
        chunks, _ = tokenize_and_chunk(load_documents(toy_world[split]), tokenizer, 64)
        nll_sum = correct = count = 0
        per_chunk[split] = []
        for ids in chunks["input_ids"]:
            x = torch.tensor([list(ids)])
            with torch.no_grad():
                logits = model(input_ids=x).logits[0, :-1].double()
            target = x[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            nll_sum += nll
            count += len(target)
            correct += int((logits.argmax(-1) == target).sum())
            per_chunk[split].append(nll / len(target))
        assert before["splits"][split]["loss"] == pytest.approx(nll_sum / count, rel=1e-5)
        assert before["splits"][split]["accuracy"] == pytest.approx(correct / count, abs=1e-9)
    scores = [-v for v in per_chunk["forget"] + per_chunk["approximate"]]
    labels = [1] * len(per_chunk["forget"]) + [0] * len(per_chunk["approximate"])
    assert before["mia"]["loss"]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)


def test_run_writes_report_and_metrics(runs):
    for name in ("metrics.json", "report.md", "plots/roc.png", "plots/hist.png", "summary.json"):
        assert (runs["two"] / name).is_file(), name
    from dsunlearn.eval.verdict import verdict_line
    metrics = json.loads((runs["two"] / "metrics.json").read_text())
    summary = json.loads((runs["two"] / "summary.json").read_text())
    rows = _rows(runs["two"])
    assert metrics["schema_version"] == 3 and metrics["audits"] is None
    assert metrics["steps"] == NUM_STEPS == summary["steps"] == rows[-1]["step"]
    assert [h["step"] for h in metrics["history"]] == [0, NUM_STEPS]
    # No stop rule: the exported weights are the final ones, and "after" is their evaluation.
    assert metrics["exported_step"] == NUM_STEPS and metrics["after"]["splits"] == metrics["history"][-1]["splits"]
    assert metrics["before"]["splits"] == metrics["history"][0]["splits"]
    assert metrics["verdict"] == verdict_line(metrics["judgement"]) == verdict_line(metrics["after"]["judgement"])
    assert metrics["cost"] == summary["cost"] and summary["cost"]["steps"] == NUM_STEPS
    assert summary["skipped_steps"] == sum(r["skipped"] for r in rows) == 0 and summary["errors"] == []
    # The report states the same figures.
    report = (runs["two"] / "report.md").read_text()
    assert f"**verdict: {metrics['verdict']}**" in report
    assert f"steps run: {NUM_STEPS}; weights exported from step {NUM_STEPS}" in report
    for split, m in metrics["after"]["splits"].items():
        before = metrics["before"]["splits"][split]
        assert f"| {split} | {before['loss']:.3f} | {m['loss']:.3f} |" in report, split


def test_generation_two_ranks_match_one_rank_and_plain_decoding(runs, toy_world):
    """Generation at the end of the run (12 prompts per split in 3 batches of 4 (eval.micro_batch_size), dealt to 2
    ranks under ZeRO-3: rank 1 runs out of batches first and steps along, synced) writes 1 rank's token ids, and
    those of a plain transformers ``model.generate`` of each directory, one prompt at a time, on one process; so do
    11 KnowMem questions of uneven length (left-padded batches of 4, 4 and 3)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from dsunlearn.data import load_documents, tokenize_and_chunk
    from dsunlearn.eval.generate import knowmem_prompt
    one = json.loads((runs["one"] / "generations.json").read_text())
    two = json.loads((runs["two"] / "generations.json").read_text())
    metrics = json.loads((runs["one"] / "metrics.json").read_text())["generation"]
    assert set(one["generated"]) == {"before", "after"}  # no twin in this run
    assert one["sets"]["verbmem/forget"]["num_prompts"] == 12 and set(one["sets"]) == {
        "verbmem/forget", "verbmem/approximate", "verbmem/retain", "knowmem/retain"}
    assert one["sets"]["knowmem/retain"]["num_prompts"] == 11
    assert two["generated"] == one["generated"]
    tokenizer = AutoTokenizer.from_pretrained(toy_world["model"])
    prefix, new = metrics["prefix"], metrics["verbmem_tokens"]
    chunks, _ = tokenize_and_chunk(load_documents(toy_world["forget"]), tokenizer, 64)
    chunks = [list(c) for c in chunks["input_ids"] if len(c) > prefix][:12]
    questions = [q["question"] for q in json.loads((runs["one"].parent / "retain_qa.json").read_text())]
    lengths = {len(tokenizer(knowmem_prompt(q))["input_ids"]) for q in questions}
    assert len(lengths) > 5  # uneven prompts, really

    def plain_generate(model, prompt, limit):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=limit, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        ids = out[0, len(prompt):].tolist()
        return ids[:ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids

    for label, path in (("before", toy_world["model"]), ("after", runs["one"] / "model")):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        for chunk, ids in zip(chunks, one["generated"][label]["verbmem/forget"]):
            limit = len(chunk[prefix:prefix + new])
            assert ids == plain_generate(model, chunk[:prefix], limit)[:limit], label
        for q, ids in zip(questions, one["generated"][label]["knowmem/retain"]):
            assert ids == plain_generate(model, tokenizer(knowmem_prompt(q))["input_ids"], 6), (label, q)
    report = (runs["two"] / "report.md").read_text()
    assert "VerbMem (MUSE)" in report and "What each model writes after a forget prefix" in report
    assert (runs["two"] / "plots" / "memorisation.png").is_file()
