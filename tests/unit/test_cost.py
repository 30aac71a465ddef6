"""Analytic FLOPs (dsunlearn.cost) against torch's FlopCounterMode on a tiny Llama, and the retraining estimate."""
from __future__ import annotations

import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from dsunlearn.cost import (
    KNOWN_PRETRAINING,
    ModelShape,
    Pass,
    count_parameters,
    forward_flops,
    retrain_estimate,
    retrain_flops,
    run_cost,
    step_flops,
    train_flops,
)
from dsunlearn.eval.report import cost_section

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, FORGET, RETAIN = 1024, 128, 2, 3  # forget/retain batch sizes in sequences
TOLERANCE = 0.10


def tiny_config(**overrides):
    kw = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=SEQ, tie_word_embeddings=False)
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def tiny_llama(attn_implementation="eager", **overrides):
    torch.manual_seed(0)
    # FlopCounterMode (torch 2.13) has no formula for the CPU SDPA kernel (_scaled_dot_product_flash_attention_for_cpu)
    # and counts 0 for attention under the default "sdpa"; eager attention is plain bmm and is counted.
    if attn_implementation is not None:
        overrides["attn_implementation"] = attn_implementation
    return transformers.LlamaForCausalLM(tiny_config(**overrides))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def reference():
    ref = tiny_llama().eval()
    ref.requires_grad_(False)
    return ref


def batch(num_seqs, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (num_seqs, SEQ), generator=g)


def counted(fn, custom_mapping=None):
    with FlopCounterMode(display=False, custom_mapping=custom_mapping) as counter:
        fn()
    return counter.get_total_flops()


def train_pass(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out


def close(analytic, measured):
    ratio = analytic / measured
    assert abs(ratio - 1) < TOLERANCE, f"analytic/measured = {ratio:.4f}"
    return ratio


def test_train_step_matches_flop_counter(model):
    ids = batch(FORGET, 0)
    shape = ModelShape.from_model(model)
    close(train_flops(shape, ids.numel(), SEQ), counted(lambda: train_pass(model, ids)))


def test_reference_forward_matches_flop_counter(model, reference):
    ids = batch(RETAIN, 1)
    shape = ModelShape.from_model(model)

    def ref_forward():
        with torch.no_grad():
            reference(input_ids=ids)

    measured = counted(ref_forward)
    close(forward_flops(shape, ids.numel(), SEQ), measured)
    close(step_flops(shape, SEQ, [Pass("reference_forward", ids.numel())])["total"], measured)


def test_forward_is_matmul_count_plus_attention(model):
    # Exact decomposition: the analytic forward exceeds the counted one only by the norm weights (no matmul).
    ids = batch(1, 2)
    shape = ModelShape.from_model(model)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    measured = counted(lambda: model(input_ids=ids))
    assert forward_flops(shape, ids.numel(), SEQ) - 2 * norms * ids.numel() == measured


def test_method_steps_match_flop_counter(model, reference):
    forget, retain = batch(FORGET, 3), batch(RETAIN, 4)
    fused = torch.cat([forget, retain])
    shape = ModelShape.from_model(model)
    f, r = forget.numel(), retain.numel()

    def ga_kl():
        out = train_pass(model, fused)
        with torch.no_grad():
            reference(input_ids=fused[FORGET:])  # the reference only sees the retain part
        return out

    cases = {
        "ga": ([Pass("train", f)], lambda: train_pass(model, forget)),
        "ga_gd": ([Pass("train", f + r)], lambda: train_pass(model, fused)),
        "ga_kl": ([Pass("train", f + r), Pass("reference_forward", r)], ga_kl),
    }
    for name, (passes, run) in cases.items():
        analytic = step_flops(shape, SEQ, passes)
        assert analytic["total"] == sum(v for k, v in analytic.items() if k != "total")
        close(analytic["total"], counted(run))
    kl = step_flops(shape, SEQ, cases["ga_kl"][0])
    assert kl["reference_forward"] * 3 * (f + r) == kl["train"] * r


def test_default_sdpa_attention_counted_with_cpu_mapping():
    model = tiny_llama(attn_implementation=None)  # transformers' default
    assert model.config._attn_implementation == "sdpa"
    aten = torch.ops.aten
    mapping = {}
    if aten._scaled_dot_product_flash_attention_for_cpu not in flop_counter.flop_registry:
        mapping = {
            aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v),
        }
    ids = batch(FORGET, 5)
    # The flash backward recomputes the scores (5 attention matmuls instead of 4): hardware FLOPs a little above ours.
    close(train_flops(ModelShape.from_model(model), ids.numel(), SEQ), counted(lambda: train_pass(model, ids), mapping))


def test_count_parameters_untied_and_tied():
    untied = count_parameters(tiny_llama())
    assert untied["embedding"] == 2 * VOCAB * 64
    tied_model = tiny_llama(tie_word_embeddings=True)
    assert tied_model.lm_head.weight is tied_model.model.embed_tokens.weight
    tied = count_parameters(tied_model)
    assert tied["total"] == untied["total"] - VOCAB * 64
    assert tied["embedding"] == VOCAB * 64
    assert tied["non_embedding"] == untied["non_embedding"]
    # Tying does not change the compute: the logits matmul is counted either way.
    a, b = ModelShape.from_model(tied_model), ModelShape.from_model(tiny_llama())
    assert forward_flops(a, 10, SEQ) == forward_flops(b, 10, SEQ)


def test_count_parameters_zero3_partitioned():
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.proj = torch.nn.Linear(4, 4, bias=False)
            for p, n in ((self.embed.weight, 40), (self.proj.weight, 16)):
                p.data = torch.empty(0)  # what ZeRO-3 leaves on each rank
                p.ds_numel = n

    counts = count_parameters(Fake())
    assert counts == {"total": 56, "embedding": 40, "non_embedding": 16}


def test_engine_like_wrapper_is_unwrapped(model):
    class Engine(torch.nn.Module):  # like deepspeed.DeepSpeedEngine: the model is in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert ModelShape.from_model(Engine(model)) == ModelShape.from_model(model)


def test_from_hf_config_matches_model(model):
    assert ModelShape.from_hf_config(model.config) == ModelShape.from_model(model)
    given = ModelShape.from_hf_config(model.config, num_params=count_parameters(model)["total"])
    assert given == ModelShape.from_model(model)


def yi_6b_config():
    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=4, vocab_size=64000,
                                    max_position_embeddings=4096, tie_word_embeddings=False)


def test_retraining_counts_the_same_matmul_weights_as_unlearning():
    """An untied model: neither side counts the input embedding table; the logits matrix is counted once on both."""
    d, layers, kv_dim, ffn = 64, 2, 2 * 16, 172  # 2 KV heads of head_dim 64 / 4
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * ffn + 2 * d  # q, o; k, v; gate, up, down; two RMSNorm weights
    non_embedding = layers * per_layer + d                        # + the final norm
    logits = d * VOCAB                                            # lm_head, untied: its own d x V matrix
    table = VOCAB * d                                             # embed_tokens: indexed, no multiply
    model = tiny_llama()
    shape = ModelShape.from_model(model)
    assert shape.num_params == non_embedding + logits + table == sum(p.numel() for p in model.parameters())
    matmul = non_embedding + logits
    pretrain_tokens, steps, step_tokens = 1e9, 10, FORGET * SEQ
    # Unlearning side: per token 6 * (matmul weights) plus attention, 12 * L * d_attn * T.
    per_step = train_flops(shape, step_tokens, SEQ)
    assert per_step == (6 * matmul + 12 * layers * d * SEQ) * step_tokens
    cost = run_cost(shape, SEQ, [Pass("train", step_tokens)], steps, 0, pretrain_tokens, None, None)
    retrain = cost["retrain"]
    assert retrain["retrain_flops"] == 6 * matmul * pretrain_tokens  # not 6 * shape.num_params * D
    assert retrain["num_matmul_params"] == matmul
    assert retrain_flops(shape, pretrain_tokens) == retrain["retrain_flops"]
    assert f"N = {matmul:,} matmul weights" in "\n".join(cost_section(cost))  # the report names the N it used
    assert retrain["ratio"] == pytest.approx(6 * matmul * pretrain_tokens / (steps * per_step), rel=1e-12)
    # Tying the table to lm_head removes a parameter matrix but no multiply: the retraining cost is unchanged.
    tied = ModelShape.from_model(tiny_llama(tie_word_embeddings=True))
    assert tied.num_params == shape.num_params - table
    assert retrain_flops(tied, pretrain_tokens) == retrain_flops(shape, pretrain_tokens)
    # Attention is the only term retraining leaves out, so the ratio is below the one with pretraining attention.
    assert retrain["retrain_flops"] < train_flops(shape, int(pretrain_tokens), SEQ)


def test_study_scale_ratio():
    """The Yi-6B figures of docs/benchmarks.md and benchmarks/RESULTS.md section 5."""
    shape = ModelShape.from_hf_config(yi_6b_config())  # meta device: no memory
    assert shape.num_params == 6_061_035_520
    assert shape.num_matmul_params == 6_061_035_520 - 64000 * 4096 == 5_798_891_520  # the input table drops out
    d = KNOWN_PRETRAINING["yi-6b"][1]
    forget_tokens = 6_000_000
    # GA+GD, 1 epoch: forget + as many retain tokens trained; longest context = most attention = smallest ratio.
    unlearning = step_flops(shape, 4096, [Pass("train", 2 * forget_tokens)])["total"]
    est = retrain_estimate(shape, d, unlearning)
    assert est["retrain_flops"] == pytest.approx(1.044e23, rel=1e-3)
    assert unlearning == pytest.approx(4.948e17, rel=1e-3)
    assert est["ratio"] == pytest.approx(2.109e5, rel=1e-3)
    short = step_flops(shape, 2048, [Pass("train", 2 * forget_tokens)])["total"]
    assert retrain_estimate(shape, d, short)["ratio"] == pytest.approx(2.288e5, rel=1e-3)
    assert est["retrain_seconds"] is None
    timed = retrain_estimate(shape, d, unlearning, measured_tokens_per_s=1000.0, unlearning_tokens=2 * forget_tokens)
    assert timed["unlearning_seconds"] == pytest.approx(12_000.0)
    assert timed["retrain_seconds"] == pytest.approx(12_000.0 * est["ratio"])
    assert timed["achieved_flops_per_s"] == pytest.approx(unlearning / 12_000.0)


def test_errors():
    with pytest.raises(ValueError, match="valid kinds"):
        Pass("backward", 10)
    with pytest.raises(ValueError):
        Pass("train", -1)
    shape = ModelShape(num_params=100, num_embedding_params=10, num_layers=1, hidden_size=4, vocab_size=2)
    with pytest.raises(ValueError):
        forward_flops(shape, 10, 0)
    with pytest.raises(ValueError, match="unlearning_tokens"):
        retrain_estimate(shape, 1e12, 1e15, measured_tokens_per_s=10.0)
    with pytest.raises(ValueError, match="pretrain_tokens"):
        retrain_flops(shape, 0)
    with pytest.raises(ValueError):
        ModelShape(num_params=10, num_embedding_params=20, num_layers=1, hidden_size=4, vocab_size=2)


def test_from_hf_config_stays_on_meta_while_a_zero3_config_is_alive():
    """A HfDeepSpeedConfig alive in the process (an in-process ZeRO-3 run) makes AutoModel.from_config build under
    DeepSpeed's zero.Init, which ignores the meta device; the shape must still cost no memory."""
    from transformers import LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    handle = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        assert is_deepspeed_zero3_enabled()
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32)
        shape = ModelShape.from_hf_config(config)  # 6.7B parameters: on meta, no memory
        assert shape.num_params == 6_738_415_616
    finally:
        del handle
