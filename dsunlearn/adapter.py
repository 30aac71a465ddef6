"""LoRA unlearning: train low-rank adapters, keep the model frozen, and get theta_0 for free by switching them off.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds ``W x + (alpha / r) * B A x`` beside each targeted linear layer, with
``A`` (r x in) random, ``B`` (out x r) zero at the start, so the adapted model *is* theta_0 before the first step. The
``peft`` package injects the adapters (``adapter`` section of the run config); DeepSpeed shards them like any
parameter. Only the adapters train: the optimizer holds ~2 r (in + out) parameters per targeted layer instead of the
model, and no gradient of a frozen weight is ever stored. The frozen base still runs forward and backward (through
the activations), so a step costs ~2/3 of a full fine-tuning step in FLOPs (``cost.py``, pass kind
``adapter_train``), not less.

theta_0 for KL, NPO and RMU (``reference.mode = "adapters_off"``, the default with an adapter) is the same
model with the adapters disabled: one model in memory, no reference engine and no cache, one extra no-grad forward per
micro-step over the streams that need it (``reference.AdaptersOffReference``). Disabled LoRA layers call the base
layer alone, so these outputs are the original model's exactly (tested bit for bit).

Export: the adapters are folded into the weights they sit beside, ``W' = W + (alpha / r) B A`` (transposed for GPT-2's
Conv1D and for an embedding table, whose peft adapter is ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B``
[dim, r]), and the model is written as plain safetensors that load with ``AutoModelForCausalLM`` and no peft
(``merged_state_dict``, the same weights as peft's ``merge_and_unload``); ``adapter.save_adapter`` also writes the
adapter alone in peft's format. A layer whose weight is tied to another (an input embedding shared with the LM head)
takes no adapter (``check_adapter``): the adapter trains on one of the two uses only, and folding it into the one
shared matrix changes the other too (what ``merge_and_unload`` does), so no merged model equals the trained one.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from .config import AdapterConfig, ConfigError
from .logs import quiet_torchao

PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"


def target_modules(model: torch.nn.Module, adapter: AdapterConfig, trainable_pattern: Optional[str]):
    """The modules that get adapters: ``adapter.target_modules`` when given; else, for a method that trains only some
    weights (RMU: ``trainable_params``), the linear layers whose weight it matches; else every linear layer of the
    decoder blocks, attention and MLP (peft's ``"all-linear"``: the LM head is left out)."""
    if adapter.target_modules:
        return list(adapter.target_modules)
    if trainable_pattern is None:
        return "all-linear"
    regex = re.compile(trainable_pattern)
    names = [n for n, m in model.named_modules() if hasattr(m, "weight") and regex.fullmatch(f"{n}.weight")]
    if not names:
        raise ConfigError(f"adapter: the method's trainable_params {trainable_pattern!r} matches no layer to adapt; "
                          f"set adapter.target_modules")
    return names


def check_adapter(model_config, adapter: AdapterConfig, trainable_pattern: Optional[str] = None) -> None:
    """Before any weights load (``prepare``): every ``adapter.target_modules`` entry names a module of the model (peft
    matches a full name or a ``.``-separated suffix), the default targets exist, and no target's weight is tied to
    another module's (``tie_word_embeddings``: the embedding and the LM head share one matrix, see the module
    docstring)."""
    from .cost import meta_model
    model = meta_model(model_config)
    names = [n for n, _ in model.named_modules() if n]
    targets = target_modules(model, adapter, trainable_pattern)
    if isinstance(targets, str):
        return
    owners: dict[int, list[str]] = {}  # every name of each parameter: a tied matrix has several
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n.removesuffix(".weight"))
    tied = {n: [o for o in group if o != n] for group in owners.values() if len(group) > 1 for n in group}
    for key in targets:
        matched = [n for n in names if n == key or n.endswith("." + key)]
        if not matched:
            raise ConfigError(f"adapter.target_modules: no module of the model is named {key!r} (e.g. "
                              f"{', '.join(n for n in names if n.count('.') >= 3)[:160]}...)")
        for name in matched:
            if name in tied:
                raise ConfigError(f"adapter.target_modules: {key!r} selects {name}, whose weight is tied to "
                                  f"{', '.join(tied[name])} (tie_word_embeddings): its adapter cannot be merged into "
                                  f"the shared matrix without changing {tied[name][0]} too; leave it out, or untie the "
                                  f"model's embeddings")


def apply_adapter(model: torch.nn.Module, adapter: AdapterConfig, trainable_pattern: Optional[str] = None,
                  seed: int = 0):
    """``model`` wrapped by peft with LoRA adapters (``adapter``); every other parameter frozen. Before
    ``deepspeed.initialize``: DeepSpeed then partitions the adapters like the rest. ``A`` is drawn from ``seed``
    (``train.seed``): every rank, and a run on any number of ranks, starts from the same adapters."""
    with quiet_torchao():
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("adapter.rank > 0 needs the peft package: pip install 'dsunlearn[lora]'") from None
    targets = target_modules(model, adapter, trainable_pattern)
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                        target_modules=targets, bias="none")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wrapped = get_peft_model(model, config)
    except ValueError as e:  # peft: a target module not found, or of a type it cannot adapt
        raise ConfigError(f"adapter.target_modules: {e}") from None
    return wrapped


def is_adapted(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def adapters_disabled(model: torch.nn.Module):
    """The context in which ``model`` (a peft model, or a DeepSpeed engine around one) computes theta_0: every
    adapter off."""
    inner = getattr(model, "module", None)
    return (inner if isinstance(inner, torch.nn.Module) else model).disable_adapter()


def _fan_in_fan_out(model: torch.nn.Module) -> set[str]:
    """Adapted layers whose weight is stored [in, out] (GPT-2's Conv1D), by state-dict prefix."""
    return {f"{name}." for name, module in model.named_modules()
            if getattr(module, "fan_in_fan_out", False) and hasattr(module, "base_layer")}


def merged_state_dict(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a peft model (``model``, for its LoRA settings) with every adapter folded in and peft's
    names undone: ``...q_proj.base_layer.weight`` + ``lora_B @ lora_A * alpha / r`` -> ``...q_proj.weight``
    (an embedding: ``+ (lora_embedding_B @ lora_embedding_A).T * alpha / r``). The arithmetic is in fp32, the result
    in the weight's dtype."""
    lora_layers = {f"{name}.": module for name, module in model.named_modules()
                   if hasattr(module, "base_layer") and hasattr(module, "lora_A")}
    transposed = _fan_in_fan_out(model)
    out = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len("base_layer.weight")]
            layer = lora_layers[prefix]
            if ADAPTER_NAME in getattr(layer, "lora_embedding_A", {}):  # peft's Embedding: the table is [vocab, dim]
                a = state_dict[f"{prefix}lora_embedding_A.{ADAPTER_NAME}"].float()  # [r, vocab]
                b = state_dict[f"{prefix}lora_embedding_B.{ADAPTER_NAME}"].float()  # [dim, r]
                delta = (b @ a).t() * layer.scaling[ADAPTER_NAME]  # peft's Embedding.get_delta_weight
            else:
                a = state_dict[f"{prefix}lora_A.{ADAPTER_NAME}.weight"].float()
                b = state_dict[f"{prefix}lora_B.{ADAPTER_NAME}.weight"].float()
                delta = (b @ a) * layer.scaling[ADAPTER_NAME]
                if prefix in transposed:
                    delta = delta.t()
            value = (value.float() + delta).to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value
    return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in out.items()}
