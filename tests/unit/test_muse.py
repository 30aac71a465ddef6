"""MUSE's data read from a local copy (dsunlearn/muse.py): a small synthetic corpus in MUSE's layout, made here, run
end to end with ``dsunlearn eval`` and with ``unlearn``; generated scores checked against a plain transformers model."""
import json
from pathlib import Path

import pytest

from dsunlearn.cli import main
from dsunlearn.config import ConfigError, load_run_config
from helpers import CPU_ZERO3


def write_muse_copy(root: Path, world: dict) -> Path:
    """MUSE's folders and field names from the toy world's documents: raw/{forget,retain1,holdout} (JSON lists of
    ``{"text"}``, a JSONL for one, as copies differ), verbmem/forget.json (``prompt``/``gt``: a document's first 12
    words and the next 24), knowmem/{forget_qa,forget_qa_icl,retain_qa}.json (``question``/``answer``)."""
    docs = {name: [json.loads(line)["text"] for line in open(world[name])] for name in ("forget", "retain",
                                                                                         "approximate")}
    for sub in ("raw", "verbmem", "knowmem"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "raw" / "forget.json").write_text(json.dumps([{"text": t} for t in docs["forget"]]))
    (root / "raw" / "retain1.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs["retain"]))
    (root / "raw" / "holdout.json").write_text(json.dumps([{"text": t} for t in docs["approximate"]]))
    words = [t.split() for t in docs["forget"]]
    (root / "verbmem" / "forget.json").write_text(json.dumps(
        [{"prompt": " ".join(w[:12]), "gt": " ".join(w[12:36])} for w in words[:6]]))
    qa = lambda ws: [{"question": f"Which word follows {w[3]} {w[4]}?", "answer": w[5]} for w in ws]  # noqa: E731
    (root / "knowmem" / "forget_qa.json").write_text(json.dumps(qa(words[:5])))
    (root / "knowmem" / "forget_qa_icl.json").write_text(json.dumps(qa(words[10:12])))
    retain_words = [t.split() for t in docs["retain"]]
    (root / "knowmem" / "retain_qa.json").write_text(json.dumps(qa(retain_words[:4])))
    return root


def muse_config(path: Path, world: dict, muse: Path, run_dir: Path, **eval_values) -> Path:
    cfg = {"model": {"path": world["model"]},
           "data": {"muse": str(muse), "seq_len": 64},
           "method": {"name": "ga_gd"},
           "train": {"lr": 1e-3, "micro_batch_size": 2, "num_steps": 2, "warmup_ratio": 0.0},
           "eval": {"max_chunks": 8, "micro_batch_size": 4, "split_check": False, "generation_prompts": 8,
                    "verbmem_tokens": 16, "knowmem_tokens": 6, **eval_values},
           "output": {"run_dir": str(run_dir)}}
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def muse(toy_world, tmp_path_factory):
    return write_muse_copy(tmp_path_factory.mktemp("MUSE-News"), toy_world)


def test_muse_layout_fills_the_data_and_prompt_files(muse, toy_world, tmp_path):
    cfg = load_run_config(str(muse_config(tmp_path / "run.json", toy_world, muse, tmp_path / "run")))
    assert (cfg.data.forget, cfg.data.retain, cfg.data.approximate) == (
        str(muse / "raw/forget.json"), str(muse / "raw/retain1.jsonl"), str(muse / "raw/holdout.json"))
    assert (cfg.eval.verbmem_file, cfg.eval.knowmem_forget, cfg.eval.knowmem_retain) == (
        str(muse / "verbmem/forget.json"), str(muse / "knowmem/forget_qa.json"), str(muse / "knowmem/retain_qa.json"))
    # One owner per knob: a field set both ways is an error naming it; the resolved config (a resume) is not.
    data = json.loads((tmp_path / "run.json").read_text())
    data["data"]["forget"] = toy_world["forget"]
    (tmp_path / "both.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"data\.forget: set by data\.muse"):
        load_run_config(str(tmp_path / "both.json"))
    data["data"]["forget"] = str(muse / "raw/forget.json")
    (tmp_path / "same.json").write_text(json.dumps(data))
    assert load_run_config(str(tmp_path / "same.json")).data.forget == cfg.data.forget
    with pytest.raises(ConfigError, match="knowmem: no raw/forget"):
        load_run_config(str(tmp_path / "run.json"), [f"data.muse={muse / 'knowmem'}"])


def test_bad_prompt_file_is_one_clear_error(muse, toy_world, tmp_path):
    from dsunlearn.eval.memorisation import read_pairs
    bad = tmp_path / "qa.json"
    bad.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ConfigError, match=r"qa\.json: entry 0: expected an object with string fields 'question' "
                                          r"and 'answer'"):
        read_pairs(str(bad), ("question", "answer"))
    bad.write_text("[{")
    with pytest.raises(ConfigError, match="malformed JSON"):
        read_pairs(str(bad), ("question", "answer"))


def test_muse_copy_end_to_end_eval_and_unlearn(muse, toy_world, tmp_path, capsys):
    """``dsunlearn eval`` and ``unlearn`` on the MUSE copy: MUSE's four criteria in metrics.json and the report;
    the eval's KnowMem and VerbMem per prompt equal those of a plain transformers model (one process, no engine)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from dsunlearn.eval.generate import rouge_l_f1
    from dsunlearn.eval.memorisation import knowmem_set, read_pairs, score_set
    cfg = muse_config(tmp_path / "run.json", toy_world, muse, tmp_path / "run")
    out = tmp_path / "scored"
    assert main(["eval", "--model", toy_world["model"], "--config", str(cfg), "--zero", CPU_ZERO3,
                 "--out", str(out)]) == 0
    gen = json.loads((out / "metrics.json").read_text())["generation"]
    assert gen["sets"]["verbmem/forget"] == {"num_prompts": 6, "source": str(muse / "verbmem/forget.json")}
    assert gen["sets"]["knowmem/forget"] == {"num_prompts": 5, "source": str(muse / "knowmem/forget_qa.json"),
                                             "examples": 2}
    assert gen["sets"]["knowmem/retain"]["examples"] == 0 and "verbmem/approximate" in gen["sets"]
    model = AutoModelForCausalLM.from_pretrained(toy_world["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_world["model"])
    plain = score_set(model, knowmem_set(
        "forget", read_pairs(str(muse / "knowmem/forget_qa.json"), ("question", "answer")), tokenizer,
        read_pairs(str(muse / "knowmem/forget_qa_icl.json"), ("question", "answer")), 6, "by hand"), tokenizer)
    assert gen["per_prompt"]["model"]["knowmem/forget"] == pytest.approx(plain["per_prompt"], abs=1e-12)
    generated = json.loads((out / "generations.json").read_text())["generated"]["model"]["verbmem/forget"]
    truths = [gt for _, gt in read_pairs(str(muse / "verbmem/forget.json"), ("prompt", "gt"))]
    assert gen["per_prompt"]["model"]["verbmem/forget"] == pytest.approx(
        rouge_l_f1([tokenizer.decode(g, skip_special_tokens=True) for g in generated], truths), abs=1e-12)
    assert all(0 <= v <= 1 for v in gen["scores"]["model"].values())
    report = (out / "report.md").read_text()
    assert "MUSE's criteria" in report and "PrivLeak, Min-40%" in report and "KnowMem on retain" in report

    run_dir = tmp_path / "run"
    assert main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["generation"]["scores"]) == {"before", "after"}
    # The state before unlearning is the model eval scored: the same generations, so the same scores.
    assert metrics["generation"]["scores"]["before"] == pytest.approx(gen["scores"]["model"], abs=1e-12)
    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["data"]["forget"] == str(muse / "raw/forget.json")
    assert "MUSE's criteria" in (run_dir / "report.md").read_text()
