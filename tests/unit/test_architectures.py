"""A user's local HF model directory of the common causal-LM families loads, unlearns and exports (1 CPU rank)."""
import json

import pytest
import torch

from dsunlearn.config import load_run_config
from dsunlearn.loop import unlearn
from helpers import CPU_ZERO3


def _tiny(kind: str, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM
    v = len(tokenizer) + 16  # models often reserve more rows than the tokenizer uses
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_positions=128))
    if kind == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64,
                                                max_position_embeddings=128))
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128))


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "qwen2"])
def test_family_unlearns_and_exports(kind, toy_world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(toy_world["model"])
    torch.manual_seed(0)
    model_dir = tmp_path / kind
    _tiny(kind, tokenizer).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    cfg = load_run_config(None, [f"model.path={model_dir}", f"data.forget={toy_world['forget']}",
                                 f"data.retain={toy_world['retain']}", "data.seq_len=64", "train.num_steps=2",
                                 "train.micro_batch_size=2", "train.lr=1e-3", "eval.splits=[]",
                                 f"output.run_dir={tmp_path / 'run'}"])
    assert unlearn(cfg, CPU_ZERO3) == 0
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(abs(r["loss/total"]) < 20 for r in log)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert type(exported).__name__ == type(_tiny(kind, tokenizer)).__name__
