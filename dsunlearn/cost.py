"""Analytic FLOPs per unlearning step and the "retrain from scratch" estimate.

Single-device and pure: nothing here imports deepspeed or reads parameter values, only their sizes, so it is correct on
a ZeRO-3 model (where ``p.numel()`` is 0 and the real size is ``p.ds_numel``) and on a meta-device copy.

Formula (per token, sequence length ``T``), the one nanoGPT's ``estimate_mfu`` uses (from the PaLM paper, appendix B,
which refines Kaplan et al. 2020, arXiv:2001.08361, Table 1, and matches the matmul terms of Chinchilla,
arXiv:2203.15556, appendix F)::

    forward = 2 * (N - N_emb)      every non-embedding weight is used in one multiply-add per token
            + 2 * d * V            the logits matmul (counted whether or not it is tied to the input embedding)
            + 4 * L * d_attn * T   attention scores Q @ K^T and the weighted sum P @ V, full T x T
    train   = 3 * forward          backward = 2 * forward (gradient w.r.t. inputs and w.r.t. weights)
            = 6 * (N - N_emb) + 6 * d * V + 12 * L * d_attn * T

``N`` is every parameter; ``N_emb`` the lookup tables (token and learned position embeddings) plus the output embedding
(``lm_head``), so ``N - N_emb`` is Kaplan's non-embedding count whether or not the model ties its embeddings; the lookup
itself costs no FLOPs and the output embedding is counted once, as the ``2 * d * V`` logits term. For a tiny model with a
large vocabulary that term dominates. ``d_attn = num_attention_heads * head_dim`` (grouped-query attention repeats K/V, so
its cost follows the query heads). Like nanoGPT, PaLM, Chinchilla and ``torch.utils.flop_counter``, causal masking is not
discounted and element-wise work (norms, softmax, rotary, activations, the loss) is ignored. These are *model* FLOPs:
recomputation (activation checkpointing, flash-attention backward) is not counted.

The retraining cost is ``6 * N_mm * D`` for ``D`` pretraining tokens, with ``N_mm = (N - N_emb) + d * V``
(:attr:`ModelShape.num_matmul_params`): the same weights the unlearning side counts per token, so one parameter
convention holds on both sides of the ratio. It is Kaplan et al.'s ``C = 6ND`` (2020, section 2.1, ``N`` non-embedding)
plus the logits matmul (their Table 1 "De-embed" row), without the attention term. Counting the whole ``N`` instead
would add ``6 * V * d * D`` FLOPs for an input table that is only indexed (+4.5% for Yi-6B, more than the attention
it leaves out when pretraining at ``T`` below ~1k). Attention is left out, rather than taken from ``train_flops`` at
the pretraining context, because model cards rarely give one context length (Yi and Llama 3 extend it in a last
stage); without it the estimate is a lower bound at any context, and so is the ratio (see :func:`retrain_flops`).
"""
from __future__ import annotations

import dataclasses

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "KNOWN_PRETRAINING",
    "PASS_KINDS",
    "ModelShape",
    "Pass",
    "count_parameters",
    "forward_flops",
    "retrain_estimate",
    "retrain_flops",
    "step_flops",
    "train_flops",
]


def _numel(p: torch.Tensor) -> int:
    # ZeRO-3 replaces p.data by an empty tensor on every rank; the real size lives in p.ds_numel.
    return int(getattr(p, "ds_numel", p.numel()))


def _unwrap(model: Any) -> torch.nn.Module:
    # A DeepSpeed engine or DDP wrapper holds the real model in .module; reaching for it needs no deepspeed import.
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Count parameters as ``{"total", "embedding", "non_embedding"}``, each shared Parameter once.

    ``embedding`` is every ``nn.Embedding`` weight (token and learned position tables) plus the output embedding
    (``model.get_output_embeddings()``, the ``lm_head``) when it is a separate, untied matrix. Correct under ZeRO-3,
    where ``p.numel()`` is 0 and the true size is ``p.ds_numel``. A DeepSpeed engine is unwrapped to its ``.module``.
    """
    model = _unwrap(model)
    # Tied weights are one Parameter object: counted once. LoRA adapters are not part of the model's shape (their
    # FLOPs are ModelShape.num_adapter_params).
    params = {id(p): p for n, p in model.named_parameters() if ".lora_" not in n}
    embedding_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embedding_ids.update(id(p) for p in module.parameters(recurse=False))
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, torch.nn.Module):
        embedding_ids.update(id(p) for p in output.parameters())
    total = sum(_numel(p) for p in params.values())
    embedding = sum(_numel(p) for i, p in params.items() if i in embedding_ids)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


@dataclass(frozen=True)
class ModelShape:
    """The few numbers the FLOPs formulas need, for a decoder-only transformer LM."""

    num_params: int
    """All parameters, each shared (tied) matrix once."""
    num_embedding_params: int
    """Input lookup tables plus the untied output embedding (see :func:`count_parameters`)."""
    num_layers: int
    hidden_size: int
    vocab_size: int
    attention_dim: int | None = None
    num_adapter_params: int = 0
    """LoRA adapter parameters beside the model (``adapter.py``): 6 FLOPs each per token of an ``adapter_train``
    pass."""
    """``num_attention_heads * head_dim``; ``None`` means ``hidden_size`` (true for Llama, Mistral, GPT-2, Yi...)."""

    def __post_init__(self) -> None:
        for name in ("num_params", "num_layers", "hidden_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.num_embedding_params <= self.num_params:
            raise ValueError(f"ModelShape.num_embedding_params must be in [0, num_params={self.num_params}], "
                             f"got {self.num_embedding_params}")

    @property
    def num_non_embedding_params(self) -> int:
        return self.num_params - self.num_embedding_params

    @property
    def num_matmul_params(self) -> int:
        """Weights used in one multiply-add per token: non-embedding ones plus the logits matrix ``d * V``."""
        return self.num_non_embedding_params + self.hidden_size * self.vocab_size

    @property
    def attn_dim(self) -> int:
        return self.hidden_size if self.attention_dim is None else self.attention_dim

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelShape:
        """Shape of a Hugging Face causal LM (or a DeepSpeed engine around one); ZeRO-3 partitioned models are fine."""
        model = _unwrap(model)
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"{type(model).__name__} has no .config; build the shape with ModelShape(...) directly")
        counts = count_parameters(model)
        shape = cls._from_config(config, counts["total"], counts["embedding"])
        adapter = sum(_numel(p) for n, p in model.named_parameters() if ".lora_" in n)
        return dataclasses.replace(shape, num_adapter_params=adapter) if adapter else shape

    @classmethod
    def from_hf_config(cls, config: Any, num_params: int | None = None) -> ModelShape:
        """Shape from a Hugging Face config.

        Without ``num_params`` the model is instantiated on the meta device (no memory, about 1 s for 6B parameters)
        and counted exactly. With ``num_params`` (e.g. the count on the model card) nothing is built and the embedding
        count is ``V * d``, doubled when ``tie_word_embeddings`` is false.
        """
        if num_params is None:
            counts = count_parameters(meta_model(config))
            return cls._from_config(config, counts["total"], counts["embedding"])
        text = text_config(config)
        tied = bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", True)))
        embedding = text.vocab_size * text.hidden_size * (1 if tied else 2)
        return cls._from_config(config, int(num_params), embedding)

    @classmethod
    def _from_config(cls, config: Any, num_params: int, num_embedding_params: int) -> ModelShape:
        text = text_config(config)
        heads = getattr(text, "num_attention_heads", None)
        head_dim = getattr(text, "head_dim", None)
        attention_dim = None
        if heads and head_dim and heads * head_dim != text.hidden_size:
            attention_dim = heads * head_dim
        return cls(num_params=num_params, num_embedding_params=num_embedding_params,
                   num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                   attention_dim=attention_dim)


def meta_model(config: Any) -> torch.nn.Module:
    """The causal LM of a Hugging Face config on the meta device: its structure and sizes, no memory."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM  # heavy; only when needed

    # The model class itself, not AutoModelForCausalLM.from_config: that one wraps the construction in DeepSpeed's
    # zero.Init whenever a HfDeepSpeedConfig is alive anywhere in the process, which ignores the meta device (an error
    # for small models, the whole model in RAM for a 6B config).
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    with torch.device("meta"):
        return model_cls(config) if model_cls is not None else AutoModelForCausalLM.from_config(config)


def text_config(config: Any) -> Any:
    # Multimodal configs nest the language model's config; HF's attribute_map already maps n_layer/n_embd names.
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _check_tokens(num_tokens: int, seq_len: int) -> None:
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")


def forward_flops(shape: ModelShape, num_tokens: int, seq_len: int) -> int:
    """FLOPs of one forward pass over ``num_tokens`` positions in sequences of ``seq_len``.

    ``2 * (N - N_emb) + 2 * d * V + 4 * L * d_attn * seq_len`` per token (module docstring). Count padded positions
    too: they cost the same compute.
    """
    _check_tokens(num_tokens, seq_len)
    per_token = 2 * shape.num_matmul_params + 4 * shape.num_layers * shape.attn_dim * seq_len
    return per_token * num_tokens


def train_flops(shape: ModelShape, num_tokens: int, seq_len: int) -> int:
    """FLOPs of forward + backward: ``3 * forward_flops`` (nanoGPT's ``6N + 12 L H Q T`` per token)."""
    return 3 * forward_flops(shape, num_tokens, seq_len)


PASS_KINDS: dict[str, int] = {"train": 3, "adapter_train": 2, "reference_forward": 1, "forward": 1}
"""Pass kind -> multiple of one forward: a trained pass is forward + backward (the backward's two matmuls per weight:
input and weight gradients); a LoRA pass skips the frozen weights' gradients but still back-propagates through every
layer (forward + the input gradients: 2x, plus the adapters' own 6 FLOPs per parameter per token); the other two are
no-grad forwards."""


@dataclass(frozen=True)
class Pass:
    """One pass a method makes: ``kind`` in :data:`PASS_KINDS`, over ``num_tokens`` positions (batch * seq_len).

    ``"train"``: forward + backward of the trained model (a fused forget+retain batch is one pass).
    ``"reference_forward"``: no-grad forward of the frozen reference model (same architecture as the trained one).
    ``"forward"``: any other no-grad forward of this architecture, e.g. building a reference cache (once per run, not
    per step) or evaluation.
    """

    kind: str
    num_tokens: int

    def __post_init__(self) -> None:
        if self.kind not in PASS_KINDS:
            raise ValueError(f"unknown pass kind {self.kind!r}; valid kinds: {sorted(PASS_KINDS)}")
        if self.num_tokens < 0:
            raise ValueError(f"Pass.num_tokens must be >= 0, got {self.num_tokens}")


def step_flops(shape: ModelShape, seq_len: int, passes: Iterable[Pass]) -> dict[str, int]:
    """FLOPs of one optimizer step described as the list of every pass it makes.

    Returns ``{"train": ..., "reference_forward": ..., "forward": ..., "total": ...}`` (every kind present, 0 when
    unused). Examples, for a forget batch of ``F`` tokens and a retain batch of ``R``:
    GA ``[Pass("train", F)]``; GA+GD ``[Pass("train", F + R)]``; GA+KL with a reference engine
    ``[Pass("train", F + R), Pass("reference_forward", R)]``; with a cache, the step is ``[Pass("train", F + R)]``
    and the cache build ``[Pass("forward", R_total)]`` is added once for the run.
    """
    out = dict.fromkeys(PASS_KINDS, 0)
    for p in passes:
        if not isinstance(p, Pass):
            raise ValueError(f"step_flops expects Pass objects, got {type(p).__name__}")
        out[p.kind] += PASS_KINDS[p.kind] * forward_flops(shape, p.num_tokens, seq_len)
        if p.kind == "adapter_train":
            out[p.kind] += 6 * shape.num_adapter_params * p.num_tokens
    out["total"] = sum(out.values())
    return out


KNOWN_PRETRAINING: dict[str, tuple[float, float]] = {
    # name: (total parameters, pretraining tokens), from model cards / papers. A convenience, not a source of truth:
    # token counts are often rounded or lower bounds ("over 15T"); cite the model card next to any number you report.
    # The retraining estimate uses only D: its N comes from the model's own shape (ModelShape.num_matmul_params),
    # not from this total, which also counts the input embedding table.
    "yi-6b": (6.06e9, 3.0e12),          # model card "3T tokens" (the Yi tech report says 3.1T)
    "llama-2-7b": (6.74e9, 2.0e12),
    "llama-2-13b": (1.30e10, 2.0e12),
    "llama-3-8b": (8.03e9, 1.5e13),     # "over 15T tokens"
    "llama-3.2-1b": (1.24e9, 9.0e12),   # "up to 9T tokens"
    "phi-1.5": (1.42e9, 1.5e11),
    "pythia-1.4b": (1.41e9, 3.0e11),
    "pythia-6.9b": (6.86e9, 3.0e11),
    "tinyllama-1.1b": (1.10e9, 3.0e12),
}


def retrain_flops(shape: ModelShape, pretrain_tokens: float) -> float:
    """Cost of pretraining from scratch, ``6 * N_mm * D`` with ``N_mm = shape.num_matmul_params`` (module docstring).

    ``N_mm`` is the parameter count :func:`train_flops` uses, so against it the only difference is attention, which
    this leaves out (about +18% for a 6B model pretrained at 4k context, +4.6% at 1k). The estimate therefore
    *under*-estimates the analytic pretraining cost at any context length, and a ratio against :func:`train_flops`
    (which counts attention) is a lower bound of the ratio those formulas give: conservative.
    """
    if pretrain_tokens <= 0:
        raise ValueError(f"pretrain_tokens must be positive, got {pretrain_tokens}")
    return 6 * shape.num_matmul_params * pretrain_tokens


def retrain_estimate(shape: ModelShape, pretrain_tokens: float, unlearning_flops: float,
                     measured_tokens_per_s: float | None = None, *,
                     unlearning_tokens: int | None = None) -> dict[str, float | None]:
    """Compare retraining ``shape`` from scratch on ``pretrain_tokens`` with an unlearning run.

    Returns ``num_matmul_params`` (the ``N`` of the estimate), ``retrain_flops`` (``6 * N * D``, :func:`retrain_flops`),
    ``unlearning_flops``, ``ratio`` (retrain / unlearning) and, when the unlearning throughput was measured,
    ``unlearning_seconds = unlearning_tokens / measured_tokens_per_s``,
    ``achieved_flops_per_s = unlearning_flops / unlearning_seconds`` and ``retrain_seconds = unlearning_seconds * ratio``:
    the time retraining would take on the same hardware at the same sustained FLOP/s (so differences in FLOPs per
    token between the unlearning method and plain pretraining are accounted for). Those three are ``None`` otherwise.
    ``unlearning_tokens`` is the number of tokens the measured throughput refers to (required with it).
    """
    if unlearning_flops <= 0:
        raise ValueError(f"unlearning_flops must be positive, got {unlearning_flops}")
    retrain = retrain_flops(shape, pretrain_tokens)
    ratio = retrain / unlearning_flops
    out: dict[str, float | None] = {"num_matmul_params": shape.num_matmul_params, "retrain_flops": retrain,
                                    "unlearning_flops": unlearning_flops, "ratio": ratio,
                                    "unlearning_seconds": None, "achieved_flops_per_s": None, "retrain_seconds": None}
    if measured_tokens_per_s is not None:
        if measured_tokens_per_s <= 0:
            raise ValueError(f"measured_tokens_per_s must be positive, got {measured_tokens_per_s}")
        if unlearning_tokens is None or unlearning_tokens <= 0:
            raise ValueError("measured_tokens_per_s needs unlearning_tokens (the tokens processed at that throughput)")
        seconds = unlearning_tokens / measured_tokens_per_s
        out.update(unlearning_seconds=seconds, achieved_flops_per_s=unlearning_flops / seconds,
                   retrain_seconds=seconds * ratio)
    return out


def run_passes(streams_tokens: dict[str, int], reference_streams: tuple, reference_mode: str,
               adapter: bool = False) -> list[Pass]:
    """The passes of one optimizer step of the unlearning loop.

    ``streams_tokens``: tokens (padded batch positions: padding is computed too) per stream per optimizer step over
    all ranks. One fused trainable pass over every stream (``adapter_train`` with LoRA); with ``reference_mode`` "engine"
    or "adapters_off" one no-grad reference forward over the streams the method needs theta_0 on (a cache costs one
    forward per chunk once, counted apart).
    """
    passes = [Pass("adapter_train" if adapter else "train", sum(streams_tokens.values()))]
    if reference_streams and reference_mode in ("engine", "adapters_off"):
        passes.append(Pass("reference_forward", sum(streams_tokens[s] for s in reference_streams)))
    return passes


def run_cost(shape: ModelShape, seq_len: int, per_step: list[Pass], steps: int, one_time_forward_tokens: int,
             pretrain_tokens: float | None, tokens_per_s: float | None, unlearning_tokens: int | None,
             earlier_phases: tuple = ()) -> dict:
    """FLOPs of a whole run (per step x steps + one-time cache/label forwards + a phased method's earlier phases,
    each phase's record with its ``flops``) and, given D, the retraining ratio."""
    step = step_flops(shape, seq_len, per_step)
    one_time = forward_flops(shape, one_time_forward_tokens, seq_len) if one_time_forward_tokens else 0
    earlier = float(sum(r["flops"] for r in earlier_phases))
    total = step["total"] * steps + one_time + earlier
    out = {"num_params": shape.num_params, "flops_per_step": step, "steps": steps,
           "one_time_forward_flops": one_time, "unlearning_flops": total}
    if earlier_phases:
        # The measured throughput is the last phase's alone: no time estimate from it for the whole run.
        out["phases"] = list(earlier_phases)
        tokens_per_s = None
    if pretrain_tokens and total > 0:
        out["retrain"] = retrain_estimate(shape, pretrain_tokens, total, tokens_per_s,
                                          unlearning_tokens=unlearning_tokens if tokens_per_s else None)
    return out


def cost_line(cost: dict) -> str:
    """One line for the console: the run's FLOPs and, given D, the retraining comparison (``run_cost``'s dict)."""
    steps = f"{cost['steps']} steps"
    if cost.get("phases"):  # a phased method: its earlier phases, then the last phase's steps
        steps = ", ".join(f"{p['phase']} {p['flops']:.3g}" for p in cost["phases"]) + f", then {steps}"
    line = f"unlearning {cost['unlearning_flops']:.3g} FLOPs ({steps})"
    if "retrain" in cost:
        r = cost["retrain"]
        line += f"; retraining {r['retrain_flops']:.3g} FLOPs; ratio {r['ratio']:.3g}x"
    return line
