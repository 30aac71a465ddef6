"""NPO: negative preference optimisation, a bounded, reference-anchored gradient ascent.

Zhang, Lin, Bai, Mei, "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
COLM 2024 (arXiv:2404.05868).

    loss = -(2/beta) * mean_chunks log sigmoid(-beta * (log pi_theta(y) - log pi_theta0(y)))   [+ NLL(retain)]

log pi(y) is the chunk's sequence log-likelihood (a sum over its tokens). theta_0's values come from a frozen engine
or, exactly, from a cache of one number per forget chunk. ``retain_loss = "nll"`` adds the paper's NPO-RT term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method, check_positive, check_retain_loss
from .terms import npo_loss, sequence_logprob, token_nll


@dataclass(frozen=True, kw_only=True)
class NPO(Method):
    beta: float = 0.1
    """Inverse temperature (paper: 0.1 on TOFU). As beta -> 0 NPO becomes GA."""
    retain_loss: str = "none"
    """"none" (NPO) or "nll" (NPO-RT: + NLL on the retain stream, weighted by method.weights.retain)."""

    reference: ClassVar = {"forget": "seq_logprob"}
    citation: ClassVar = "Zhang et al. 2024 (arXiv:2404.05868)"

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_retain_loss(self.retain_loss)

    @property
    def streams(self):
        return ("forget", "retain") if self.retain_loss == "nll" else ("forget",)

    def terms(self, outputs):
        forget = outputs["forget"]
        out = {"forget": npo_loss(sequence_logprob(forget.logits, forget.labels), forget.reference.seq_logprob,
                                  self.beta)}
        if self.retain_loss == "nll":
            out["retain"] = token_nll(outputs["retain"].logits, outputs["retain"].labels)
        return out
