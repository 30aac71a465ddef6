"""What a method sees: the outputs of the one fused forward, split back into its streams.

A method is single-device code: it never imports deepspeed or torch.distributed and never reads parameters. The loop
builds one batch from every stream the method declares, runs one engine forward, and hands the method one
``StreamOutputs`` per stream. Methods that need the frozen original model (theta_0) declare the streams they need it on;
the loop fills ``reference`` there, from a reference engine or from a cache computed once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from ..config import ConfigError


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


@dataclass(frozen=True, kw_only=True)
class Method:
    """The loss-composition hook every method is: a frozen dataclass of its paper defaults (fields, each with a
    docstring) that subclasses this and declares only what differs from the defaults below.

    A method checks its own hyperparameters in ``__post_init__`` (raising ``ConfigError`` naming
    ``method.params.<field>``) and never imports deepspeed or torch.distributed.
    """
    streams: ClassVar[tuple[str, ...]] = ("forget",)
    """Data streams fused into each forward, e.g. ("forget", "retain")."""
    reference: ClassVar[dict] = {}
    """Streams that need theta_0's outputs -> what is needed there: "logits", "seq_logprob" or "hidden"."""
    precomputed: ClassVar[dict] = {}
    """Stream -> per-chunk field computed once before training and handed over in ``StreamOutputs.extra``:
    "random_labels" or "adversarial_labels" (see reference.py)."""
    default_weights: ClassVar[dict] = {}
    """Paper-default term weights; ``method.weights`` in the run config overrides them (others default to 1.0)."""
    needs_hidden_states: ClassVar[bool] = False
    """Ask the forward for every layer's hidden states (activation terms)."""
    hidden_index: ClassVar[Optional[int]] = None
    """Which entry of the forward's ``hidden_states`` a "hidden" reference stores."""
    trainable_params: ClassVar[Optional[str]] = None
    """Regex (re.fullmatch on parameter names): only those train (None = all); applied before the engine is built."""
    citation: ClassVar[str] = ""

    @property
    def term_names(self) -> tuple[str, ...]:
        """Names of the loss terms ``terms`` returns (run-config weights are keyed by them): one per stream."""
        return self.streams

    def stream_batch_size(self, stream: str, train) -> int:
        """Chunks of ``stream`` per rank per micro-step (``train``: the run config's train section): the forget
        stream gets ``micro_batch_size``, every other stream ``micro_batch_size * retain_ratio``."""
        return train.micro_batch_size * (1 if stream == "forget" else train.retain_ratio)

    def check_model(self, num_layers: int) -> None:
        """Refuse a model this method cannot work on, from its config.json alone (before weights load)."""

    def check_trainable(self, names: list[str]) -> None:
        """Refuse a trainable set (the names ``trainable_params`` selected) that cannot serve the objective."""

    def terms(self, outputs: dict[str, StreamOutputs]) -> dict[str, torch.Tensor]:
        """Named scalar loss terms; the loop weighs and sums them, then backpropagates once."""
        raise NotImplementedError


RETAIN_LOSSES = ("none", "nll")


def check_retain_loss(value: str) -> None:
    """The NPO family's optional plain NLL(retain) term (the papers' regularised variants)."""
    if value not in RETAIN_LOSSES:
        raise ConfigError(f"method.params.retain_loss: expected 'none' or 'nll', got {value!r}")


def check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"method.params.{name}: expected > 0, got {value}")
