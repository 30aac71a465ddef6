"""What a method sees: the outputs of the one fused forward, split back into its streams.

A method is single-device code: it never imports deepspeed or torch.distributed and never reads parameters. The loop
builds one batch from every stream the method declares, runs one engine forward, and hands the method one
``StreamOutputs`` per stream. Methods that need the frozen original model (theta_0) declare the streams they need it on;
the loop fills ``reference`` there, from a reference engine or from a cache computed once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Protocol

import torch


@dataclass
class ReferenceOutputs:
    """theta_0's outputs on one stream's chunks (whatever the reference mode, the same fields).

    ``topk_logprobs``/``topk_ids`` ([B, T, k]) and ``rest_logmass`` ([B, T], log of the probability outside the top-k)
    are filled for KL; with k = vocab they are the full distribution. ``seq_logprob`` ([B]) for NPO-style terms;
    ``hidden`` ([B, T, H]) for activation terms (RMU).
    """
    topk_logprobs: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    rest_logmass: Optional[torch.Tensor] = None
    seq_logprob: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None


@dataclass
class StreamOutputs:
    """One stream's slice of the fused forward."""
    logits: torch.Tensor
    """[B, T, V] logits of the trained model."""
    labels: torch.Tensor
    """[B, T] the true next-token labels aligned with input_ids (-100 = padding)."""
    input_ids: torch.Tensor
    extra: dict = field(default_factory=dict)
    """Per-chunk precomputed fields the method asked for (e.g. "random_labels", "adversarial_labels")."""
    hidden_states: Optional[tuple] = None
    """All layers' hidden states, only when the method sets ``needs_hidden_states``."""
    reference: Optional[ReferenceOutputs] = None


class Method(Protocol):
    """The loss-composition hook every method implements (a frozen dataclass of its paper defaults)."""
    streams: ClassVar[tuple[str, ...]]
    """Data streams fused into each forward, e.g. ("forget", "retain")."""
    term_names: ClassVar[tuple[str, ...]]
    """Names of the loss terms ``terms`` returns (weights in the run config are keyed by these)."""
    reference: ClassVar[dict]
    """Streams that need theta_0's outputs -> what is needed there: "logits", "seq_logprob" or "hidden"."""
    needs_hidden_states: ClassVar[bool]
    citation: ClassVar[str]

    # Optional (read with getattr and these defaults by the registry and the loop):
    #   precomputed: dict = {}        stream -> per-chunk field computed once before training and handed over in
    #                                 StreamOutputs.extra: "random_labels" or "adversarial_labels" (see reference.py)
    #   default_weights: dict = {}    paper-default term weights; method.weights in the run config overrides them
    #   trainable_params: str = None  regex (re.fullmatch on parameter names): only those train; set before the engine
    #   hidden_index: int             which entry of the forward's hidden_states a "hidden" reference stores

    def terms(self, outputs: dict[str, StreamOutputs]) -> dict[str, torch.Tensor]:
        """Named scalar loss terms; the loop weighs and sums them, then backpropagates once."""
        ...


class OptionalRetainNLL:
    """Shared by the NPO family: ``beta`` must be positive and ``retain_loss`` ("none" | "nll") adds a plain
    NLL(retain) term (the papers' regularised variants). Subclasses are frozen dataclasses with those two fields."""

    def __post_init__(self):
        from ..config import ConfigError
        if self.beta <= 0:
            raise ConfigError("method.params.beta: expected > 0")
        if self.retain_loss not in ("none", "nll"):
            raise ConfigError(f"method.params.retain_loss: expected 'none' or 'nll', got {self.retain_loss!r}")

    @property
    def streams(self):
        return ("forget", "retain") if self.retain_loss == "nll" else ("forget",)

    @property
    def term_names(self):
        return self.streams

    def with_retain(self, outputs, terms: dict) -> dict:
        if self.retain_loss == "nll":
            from .terms import token_nll
            retain = outputs["retain"]
            terms["retain"] = token_nll(retain.logits, retain.labels)
        return terms
