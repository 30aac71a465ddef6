"""`dsunlearn pretrain` is deterministic from its seed: the demo pair's "one command that reproduces it bit for bit"."""
import json
import shutil

import torch

from dsunlearn.config import load_run_config
from dsunlearn.pretrain import pretrain
from helpers import CPU_ZERO3


def test_pretrain_from_scratch_is_bit_reproducible(toy_world, tmp_path):
    arch = tmp_path / "arch"
    shutil.copytree(toy_world["model"], arch)
    (arch / "model.safetensors").unlink()  # architecture only: init "random" builds it from config.json
    weights = []
    for name in ("a", "b"):
        cfg = load_run_config(None, [f"model.path={arch}", "model.init=random", f"data.train={toy_world['retain']}",
                                     "data.seq_len=64", "train.num_steps=4", "train.micro_batch_size=4",
                                     "train.lr=3e-3", f"output.run_dir={tmp_path / name}"])
        assert pretrain(cfg, CPU_ZERO3) == 0
        from safetensors.torch import load_file
        weights.append(load_file(str(tmp_path / name / "model" / "model.safetensors")))
        log = [json.loads(l) for l in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert log[-1]["loss/train"] < log[0]["loss/train"]  # it learns
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_forget_chunks_join_the_train_chunks_in_one_token_mean():
    from dsunlearn.methods.base import StreamOutputs
    from dsunlearn.pretrain import LanguageModeling, LanguageModelingWithForget
    torch.manual_seed(0)
    vocab = 11
    train = StreamOutputs(logits=torch.randn(3, 6, vocab), labels=torch.randint(0, vocab, (3, 6)), input_ids=None)
    forget = StreamOutputs(logits=torch.randn(2, 6, vocab), labels=torch.randint(0, vocab, (2, 6)), input_ids=None)
    per_chunk = []
    for o in (train, forget):  # each chunk's mean next-token NLL, by hand
        logp = torch.log_softmax(o.logits[:, :-1], -1)
        per_chunk += [-logp[b, torch.arange(5), o.labels[b, 1:]].mean() for b in range(o.logits.size(0))]
    method = LanguageModelingWithForget(forget_per_batch=2)
    assert method.term_names == ("train",)
    assert torch.allclose(method.terms({"train": train, "forget": forget})["train"], torch.stack(per_chunk).mean())
    # Without the forget chunks it is the twin's loss on the same train chunks.
    assert torch.allclose(LanguageModeling().terms({"train": train})["train"], torch.stack(per_chunk[:3]).mean())


def test_forget_per_batch_needs_a_forget_set_and_the_other_way_round(toy_world, tmp_path):
    import pytest
    from dsunlearn.config import ConfigError
    from dsunlearn.pretrain import pretraining_method
    base = [f"model.path={toy_world['model']}", f"data.train={toy_world['retain']}"]
    with pytest.raises(ConfigError, match="data.forget_per_batch=2 needs data.forget"):
        pretraining_method(load_run_config(None, base + ["data.forget_per_batch=2"]))
    with pytest.raises(ConfigError, match="data.forget_per_batch is 0"):
        pretraining_method(load_run_config(None, base + [f"data.forget={toy_world['forget']}"]))
    with pytest.raises(ConfigError, match="data.forget_per_batch: expected >= 0"):
        load_run_config(None, base + ["data.forget_per_batch=-1"])
    assert pretraining_method(load_run_config(None, base + [f"data.forget={toy_world['forget']}",
                                                            "data.forget_per_batch=2"])).forget_per_batch == 2


def test_continued_pair_on_a_tiny_base(toy_world, tmp_path):
    """The whole pair path (demo/continued_pair.py) on a tiny random Llama: both continued trainings from the base,
    the same train chunks at every step, the forget chunks only in the original's batches, pair.json, and a rebuild
    with the same settings trains nothing."""
    from pathlib import Path
    from safetensors.torch import load_file
    from dsunlearn.demo.continued_pair import PairSettings, build_continued_pair
    from helpers import CPU_ZERO3
    world = Path(toy_world["forget"]).parent  # forget/retain/approximate/general.jsonl
    settings = PairSettings(seq_len=48, steps=3, train_per_batch=2, forget_per_batch=1, retain_eval_per_domain=4)
    out = tmp_path / "pair"
    pair = build_continued_pair(toy_world["model"], world, str(out), settings, Path(CPU_ZERO3), evaluate=False)
    assert json.loads((out / "pair.json").read_text()) == pair
    assert pair["settings"]["forget_per_batch"] == 1 and pair["train_chunks_identical"]
    assert pair["sets"]["train"]["chunks"] == 6 and pair["sets"]["retain"]["chunks"] == 4
    logs = {name: [json.loads(line) for line in (out / "work" / name / "log.jsonl").read_text().splitlines()]
            for name in ("original", "retrained")}
    assert [r["chunks"]["train"] for r in logs["original"]] == [r["chunks"]["train"] for r in logs["retrained"]]
    assert sorted(i for r in logs["original"] for i in r["chunks"]["train"]) == list(range(6))
    assert all(len(r["chunks"]["forget"]) == 1 for r in logs["original"])
    assert all("forget" not in r["chunks"] for r in logs["retrained"])
    assert pair["forget_chunks_seen"] == 3
    # Step 1 starts from the base in both runs, on the same train chunks: the same train NLL.
    assert abs(logs["original"][0]["nll/train"] - logs["retrained"][0]["nll/train"]) < 1e-5
    weights = {name: load_file(str(out / name / "model.safetensors")) for name in ("original", "retrained")}
    base = load_file(str(Path(toy_world["model"]) / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights["original"][key], base[key])
    assert not torch.equal(weights["original"][key], weights["retrained"][key])
    again = build_continued_pair(toy_world["model"], world, str(out), settings, Path(CPU_ZERO3), evaluate=False)
    assert again["seconds"] == {"train_original": "cached", "train_retrained": "cached"}
    # Every piece is one chunk: the runs' own chunk counts are the files' line counts.
    stats = json.loads((out / "work" / "original" / "data_stats.json").read_text())
    assert (stats["train"]["num_chunks"], stats["forget"]["num_chunks"]) == (6, pair["sets"]["forget"]["chunks"])
    # `dsunlearn demo --pair` points the demo config at the pair, its cost at the twin's (last-stage) tokens.
    import pytest
    from dsunlearn.config import ConfigError
    from dsunlearn.demo.run import DEMO_CONFIG, pair_overrides
    overrides, warnings = pair_overrides(out)
    cfg = load_run_config(str(DEMO_CONFIG), overrides)
    assert (cfg.model.path, cfg.eval.retrained_model) == (str(out / "original"), str(out / "retrained"))
    assert cfg.data.forget == str(out / "data" / "forget.jsonl") and cfg.data.seq_len == 48
    assert cfg.cost.pretrain_tokens == pair["models"]["retrained"]["tokens_seen"]
    # The rules a user can apply: a tenth of the pair's own training rate; the base it continued from.
    assert cfg.train.lr == pytest.approx(settings.lr / 10) and warnings == []
    assert Path(cfg.eval.base_model) == Path(toy_world["model"]).resolve()
    with pytest.raises(ConfigError, match="pair.json missing"):
        pair_overrides(tmp_path)
