"""LoRA unlearning (dsunlearn/adapter.py): theta_0 through "adapters off", gradients only in the adapters, every method
with an adapter, the merged export, the cost of a LoRA step, the config."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from dsunlearn import loop
from dsunlearn import reference as R
from dsunlearn.adapter import adapters_disabled, apply_adapter, check_adapter, merged_state_dict
from dsunlearn.cli import main
from dsunlearn.config import AdapterConfig, ConfigError, RunConfig, from_dict
from dsunlearn.methods import METHODS, build_method, term_weights
from dsunlearn.methods.terms import chunk_nll
from helpers import CPU_ZERO3, write_run_config
from test_methods import ONE_PHASE_METHODS, SEQ_LEN, STEP_CASES, _batches, _streams, world  # noqa: F401 - world is a fixture

LORA = AdapterConfig(rank=4, alpha=8.0)


def _randomise_adapters(model, seed=0):
    """LoRA's B starts at zero (adapted == base); give every adapter weight a value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _logits(model, ids):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_adapters_off_is_the_base_model_exactly_and_only_adapters_get_gradients(world):
    base = copy.deepcopy(world["theta0"])
    adapted = apply_adapter(copy.deepcopy(world["theta0"]), LORA)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: B moves off zero, then A gets a gradient too
        chunk_nll(_logits(adapted, ids), ids).mean().neg().backward()
        for n, p in adapted.named_parameters():
            if ".lora_" in n:
                assert p.requires_grad and p.grad is not None
            else:
                assert not p.requires_grad and p.grad is None, n
        opt.step()
        opt.zero_grad()
    assert all(p.abs().sum() > 0 for n, p in adapted.named_parameters() if ".lora_B" in n)
    with torch.no_grad():
        assert not torch.allclose(_logits(adapted, ids), _logits(base, ids))  # the adapters changed the model
        with adapters_disabled(adapted):
            assert torch.equal(_logits(adapted, ids), _logits(base, ids))  # bit for bit
        assert not torch.allclose(_logits(adapted, ids), _logits(base, ids))  # and they are back on after


def test_merged_state_dict_equals_the_adapted_model():
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    for config in (LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True),
                   GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32)):  # Conv1D: [in, out]
        torch.manual_seed(0)
        plain = AutoModelForCausalLM.from_config(config).eval()  # from_config builds in training mode: dropout
        adapted = apply_adapter(copy.deepcopy(plain), LORA)
        _randomise_adapters(adapted)
        merged = merged_state_dict(adapted.state_dict(), adapted)
        assert not any(".lora_" in k or "base_layer" in k or k.startswith("base_model") for k in merged)
        fresh = AutoModelForCausalLM.from_config(config)
        missing, unexpected = fresh.load_state_dict(merged, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want, got = _logits(adapted, ids), _logits(fresh.eval(), ids)
            assert torch.allclose(got, want, atol=1e-5), (type(config).__name__, (got - want).abs().max())
            assert not torch.allclose(got, _logits(plain.eval(), ids), atol=1e-3)


def _tiny_llama(tied):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, tie_word_embeddings=tied)


def _tiny_gpt2(tied):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32, tie_word_embeddings=tied)


@pytest.mark.parametrize("config, targets", [
    (_tiny_llama(tied=False), ("embed_tokens", "q_proj")),
    (_tiny_gpt2(tied=False), ("wte", "wpe", "c_attn")),  # Conv1D beside the embeddings
    (_tiny_gpt2(tied=True), ("wpe", "c_attn")),  # the position table is never tied
], ids=["llama", "gpt2", "gpt2-tied-wte-positions"])
def test_merged_state_dict_of_adapted_embeddings_equals_peft_merge_and_unload(config, targets):
    """An embedding's peft adapter is lora_embedding_A [r, vocab] / lora_embedding_B [dim, r]: the export folds it in
    as peft's own merge does (the same weights, key for key), and the merged model computes the adapted one."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).eval()
    adapter = AdapterConfig(rank=4, alpha=8.0, target_modules=targets)
    check_adapter(config, adapter)
    adapted = apply_adapter(copy.deepcopy(plain), adapter)
    _randomise_adapters(adapted)
    assert any(".lora_embedding_B." in n for n, _ in adapted.named_parameters())
    merged = merged_state_dict(adapted.state_dict(), adapted)
    want = copy.deepcopy(adapted).merge_and_unload().state_dict()
    assert set(merged) == set(want)
    for k in want:
        assert torch.allclose(merged[k], want[k], atol=1e-6), k
    changed = {k for k in want if not torch.equal(want[k], plain.state_dict()[k])}
    assert {k.rsplit(".", 2)[-2] for k in changed} == set(targets)  # the adapted weights, nothing else
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(merged)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(_logits(fresh.eval(), ids), _logits(adapted, ids), atol=1e-5)


@pytest.mark.parametrize("config, target, tied_to", [
    (_tiny_llama(tied=True), "embed_tokens", "lm_head"),
    (_tiny_llama(tied=True), "lm_head", "model.embed_tokens"),
    (_tiny_gpt2(tied=True), "wte", "lm_head"),
])
def test_check_adapter_refuses_a_layer_tied_to_another(config, target, tied_to):
    """A tied embedding/LM head has no merged model that equals the trained one (peft's merge_and_unload changes both
    uses of the shared matrix): refused before launch, in one line."""
    with pytest.raises(ConfigError, match=f"tied to {tied_to}") as e:
        check_adapter(config, AdapterConfig(rank=4, target_modules=(target,)))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_every_method_steps_with_an_adapter_and_adapters_off_reference(world, tmp_path, name):
    """Three LoRA steps raise the forget NLL (RMU: move the activations); only adapter weights move; theta_0 comes from
    the adapters switched off, and equals the original model's outputs bit for bit after the steps."""
    params = STEP_CASES[name]
    cfg = from_dict(RunConfig, {
        "model": {"path": world["model"]},
        "data": {k: world[k] for k in ("forget", "retain", "approximate", "general")} | {"seq_len": SEQ_LEN},
        "method": {"name": name, "params": params}, "adapter": {"rank": 4, "alpha": 8.0},
        "train": {"micro_batch_size": 4, "seed": 42}, "output": {"run_dir": str(tmp_path / "run")}})
    assert cfg.reference.mode == "adapters_off"
    method = build_method(cfg.method)
    model = apply_adapter(copy.deepcopy(world["theta0"]), cfg.adapter, method.trainable_params)
    method.check_trainable([n for n, p in model.named_parameters() if p.requires_grad])
    streams = _streams(world, cfg, world["tok"], method.streams)
    R.attach_precomputed(cfg, method, model, streams, world["tok"])
    reference = R.build_reference(cfg, {}, method, model, streams, world["tok"])
    assert (reference is None) == (not method.reference)
    if reference is not None:
        assert isinstance(reference, R.AdaptersOffReference)
    weights = term_weights(method, cfg.method)
    batches = _batches(method, streams, world["tok"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        out = loop.fused_forward(model, method, batches, reference)
    for _ in range(3):  # LoRA's first step moves only B (A's gradient is B^T-weighted: zero at the start)
        sum(weights[k] * v for k, v in method.terms(loop.fused_forward(model, method, batches, reference)).items()
            ).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        out2 = loop.fused_forward(model, method, batches, reference)
        if reference is not None:  # still theta_0 after the step
            for stream, ref in reference.outputs_for(batches, torch.device("cpu")).items():
                plain = R.EngineReference(world["theta0"], *R._check_needs(method)).outputs_for(
                    batches, torch.device("cpu"))[stream]
                for field in ("topk_logprobs", "seq_logprob", "hidden"):
                    if getattr(ref, field) is not None:
                        assert torch.equal(getattr(ref, field), getattr(plain, field)), (name, field)
    if name == "rmu":  # its loss is on activations: they moved toward c * u
        assert method.terms(out2)["forget"].item() < method.terms(out)["forget"].item()
    else:
        nll = [chunk_nll(o["forget"].logits, o["forget"].labels).mean().item() for o in (out, out2)]
        assert nll[1] > nll[0], (name, nll)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    if name == "rmu":  # the adapters sit on the layers RMU trains, nowhere else
        assert {n.split(".lora_")[0] for n in changed} <= {
            "base_model.model.model.layers.0.mlp.down_proj", "base_model.model.model.layers.1.mlp.down_proj"}


def test_lora_run_under_zero3_exports_merged_weights_and_the_adapter(world, tmp_path):
    """A GA+KL LoRA run through the real engine (ZeRO-3, one rank): the merged export loads with plain transformers
    and equals the original plus the exported adapter (peft); untouched weights are the original's bit for bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    cfg = write_run_config(tmp_path / "run.json", world, tmp_path / "run", method={"name": "ga_kl"},
                           adapter={"rank": 4, "alpha": 8.0, "save_adapter": True},
                           train={"num_steps": 3, "lr": 1e-2})
    from dsunlearn.config import load_run_config
    assert loop.unlearn(load_run_config(str(cfg)), CPU_ZERO3) == 0
    run = tmp_path / "run"
    assert json.loads((run / "reference.json").read_text())["reference"]["mode"] == "adapters_off"
    cost = json.loads((run / "summary.json").read_text())["cost"]["flops_per_step"]
    assert cost["train"] == 0 and cost["adapter_train"] > 0 and cost["reference_forward"] > 0
    merged = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    original = AutoModelForCausalLM.from_pretrained(world["model"]).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["model"]),
                                             run / "adapter").eval()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(_logits(merged, ids), _logits(with_adapter, ids), atol=1e-5)
        assert not torch.allclose(_logits(merged, ids), _logits(original, ids), atol=1e-3)
    m, o = merged.state_dict(), original.state_dict()
    assert torch.equal(m["model.embed_tokens.weight"], o["model.embed_tokens.weight"])
    assert torch.equal(m["model.norm.weight"], o["model.norm.weight"])
    assert not torch.equal(m["model.layers.0.self_attn.q_proj.weight"], o["model.layers.0.self_attn.q_proj.weight"])


def test_lora_run_on_an_embedding_under_zero3_exports_it_merged(toy_world, tmp_path):
    """An adapter on the input embedding of an untied model, trained and exported through the real engine (ZeRO-3's
    consolidated state dict): the merged model equals the original plus the exported adapter (peft); the LM head is
    the original's bit for bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from dsunlearn.config import load_run_config
    model = AutoModelForCausalLM.from_pretrained(toy_world["model"])
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    untied = tmp_path / "untied"
    model.save_pretrained(untied)
    AutoTokenizer.from_pretrained(toy_world["model"]).save_pretrained(untied)
    cfg = write_run_config(tmp_path / "run.json", {**toy_world, "model": str(untied)}, tmp_path / "run",
                           method={"name": "ga_kl"}, train={"num_steps": 3, "lr": 1e-2},
                           adapter={"rank": 4, "alpha": 8.0, "save_adapter": True,
                                    "target_modules": ["embed_tokens", "q_proj"]})
    assert loop.unlearn(load_run_config(str(cfg)), CPU_ZERO3) == 0
    run = tmp_path / "run"
    merged = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    original = AutoModelForCausalLM.from_pretrained(untied).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(untied), run / "adapter").eval()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(_logits(merged, ids), _logits(with_adapter, ids), atol=1e-5)
    m, o = merged.state_dict(), original.state_dict()
    assert not torch.equal(m["model.embed_tokens.weight"], o["model.embed_tokens.weight"])
    assert torch.equal(m["lm_head.weight"], o["lm_head.weight"])


def test_lora_flops_per_step():
    from dsunlearn.cost import ModelShape, Pass, step_flops
    shape = ModelShape(num_params=1000, num_embedding_params=200, num_layers=2, hidden_size=8, vocab_size=25,
                       num_adapter_params=10)
    full, lora = (step_flops(shape, 16, [Pass(kind, 64)]) for kind in ("train", "adapter_train"))
    forward = step_flops(shape, 16, [Pass("forward", 64)])["total"]
    assert full["total"] == 3 * forward and lora["total"] == 2 * forward + 6 * 10 * 64


@pytest.mark.parametrize("override, fragment", [
    ("reference.mode=adapters_off", "needs an adapter"),
    ("adapter.rank=-1", "adapter.rank"),
    ("adapter.dropout=1.5", "adapter.dropout"),
    ("adapter.target_modules=[\"no_such_layer\"]", "adapter.target_modules"),
    ("adapter.target_modules=[\"embed_tokens\"]", "tied to lm_head"),  # the toy model ties its embeddings
])
def test_bad_adapter_config_is_one_line_and_exit_2(toy_world, tmp_path, capsys, override, fragment):
    cfg = write_run_config(tmp_path / "run.json", toy_world, tmp_path / "run", adapter={"rank": 0})
    extra = ["--set", "adapter.rank=4"] if "target_modules" in override else []
    code = main(["unlearn", "--config", str(cfg), "--zero", CPU_ZERO3, "--set", override, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "model").exists()


def test_reference_mode_auto_follows_the_adapter():
    assert RunConfig().reference.mode == "engine"
    assert RunConfig(adapter=AdapterConfig(rank=8)).reference.mode == "adapters_off"
    assert ONE_PHASE_METHODS == set(STEP_CASES)


def test_lora_run_with_a_cached_reference_resumes_exactly(toy_world, tmp_path):
    """NPO with LoRA and theta_0 from a cache (computed from the adapted model before its first step: still theta_0),
    stopped after 2 of 4 steps and resumed: the uninterrupted run's merged weights, bit for bit."""
    from safetensors.torch import load_file
    from dsunlearn.config import load_run_config
    common = dict(method={"name": "npo"}, adapter={"rank": 4, "alpha": 8.0}, reference={"mode": "cache"},
                  checkpoint={"every_n_steps": 1})
    for name, steps in (("full", 4), ("part", 2)):
        cfg = write_run_config(tmp_path / f"{name}.json", toy_world, tmp_path / name, train={"num_steps": steps,
                               "lr": 1e-2, "schedule": "constant"}, **common)
        assert loop.unlearn(load_run_config(str(cfg)), CPU_ZERO3) == 0
    part = tmp_path / "part"
    assert loop.unlearn(load_run_config(str(part / "config.json"), ["train.num_steps=4"]),
                        str(part / "ds_config.user.json"), resume=True) == 0
    want, got = load_file(tmp_path / "full" / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
