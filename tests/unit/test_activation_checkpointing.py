"""train.activation_checkpointing: decoder layers really are recomputed in the backward, gradients are unchanged,
and frozen inputs (RMU's few trainable projections) still get gradients."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsunlearn.config import ConfigError
from dsunlearn.engine import enable_activation_checkpointing
from dsunlearn.methods.terms import chunk_nll


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, use_cache=False)
    return LlamaForCausalLM(cfg)


def _layer_calls(model):
    """Layer index per call of a layer's MLP. transformers checkpoints a layer's ``forward``, so hooks on the layer
    itself stay outside the checkpoint; its submodules run again, with their pre-hooks (where ZeRO-3 gathers). A
    post-hook is not a reliable counter: the recompute stops as soon as the last saved tensor is rebuilt."""
    calls = []
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    return calls


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    chunk_nll(model(input_ids=ids).logits, ids).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_layers_are_recomputed_and_gradients_unchanged():
    plain, ckpt = _model(), _model()
    ckpt.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(ckpt)
    plain.train(), ckpt.train()
    ids = torch.randint(0, 64, (2, 16))
    calls = _layer_calls(ckpt)
    grads, grads_ckpt = _step(plain, ids), _step(ckpt, ids)
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]  # once in the forward, once recomputed in the backward
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6, msg=name)

    calls.clear()
    ckpt.eval()
    with torch.no_grad():
        ckpt(input_ids=ids)
    assert calls == [0, 1, 2]  # evaluation and reference passes are not affected


def test_frozen_inputs_still_train_the_selected_parameters():
    model = _model()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "model.layers.1.mlp.down_proj.weight")
    reference = copy.deepcopy(model)
    enable_activation_checkpointing(model)
    model.train(), reference.train()
    ids = torch.randint(0, 64, (2, 16))
    grads, expected = _step(model, ids), _step(reference, ids)
    assert list(grads) == ["model.layers.1.mlp.down_proj.weight"]
    assert grads["model.layers.1.mlp.down_proj.weight"].abs().sum() > 0
    torch.testing.assert_close(grads["model.layers.1.mlp.down_proj.weight"],
                               expected["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=1e-6)


def test_a_model_without_support_is_a_config_error():
    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        enable_activation_checkpointing(NoCheckpointing())
