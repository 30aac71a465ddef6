"""SimNPO: NPO without the reference model, on the length-normalised likelihood, with a margin.

Fan, Liu, Lin, Jia, Zhang, Mei, Liu, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning", 2024 (arXiv:2410.07163).

    loss = -(2/beta) * mean_chunks log sigmoid(-(beta/|y|) log pi_theta(y) - gamma)  +  lambda * NLL(retain)

|y| is the chunk's number of counted tokens. Defaults are the paper's MUSE-Books setting (long text chunks, the
closest of its benchmarks to this study): beta 0.7, gamma 0, lambda 0.1 (lr 1e-5), as in the released code's MUSE
README. No reference model is needed. The released code scales its margin by beta (``sigma(beta * (-log pi/|y| -
delta))``): gamma here = beta * delta there (docs/methods.md has its other settings converted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import ConfigError
from .base import Method, check_positive, check_retain_loss
from .terms import simnpo_loss, token_nll


@dataclass(frozen=True, kw_only=True)
class SimNPO(Method):
    beta: float = 0.7
    """Inverse temperature on the length-normalised log-likelihood (paper, MUSE-Books: 0.7)."""
    gamma: float = 0.0
    """Reward margin inside the sigmoid, added after the beta scaling (paper, MUSE-Books: 0; MUSE-News: 2.25 = 0.75 x
    the released code's 3.0). Larger values keep pushing already-forgotten chunks."""
    retain_loss: str = "nll"
    """"nll" (the paper's regularised SimNPO) or "none"."""

    default_weights: ClassVar = {"retain": 0.1}
    citation: ClassVar = "Fan et al. 2024 (arXiv:2410.07163)"

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_retain_loss(self.retain_loss)
        if self.gamma < 0:
            raise ConfigError(f"method.params.gamma: expected >= 0, got {self.gamma}")

    @property
    def streams(self):
        return ("forget", "retain") if self.retain_loss == "nll" else ("forget",)

    def terms(self, outputs):
        forget = outputs["forget"]
        out = {"forget": simnpo_loss(forget.logits, forget.labels, self.beta, self.gamma)}
        if self.retain_loss == "nll":
            out["retain"] = token_nll(outputs["retain"].logits, outputs["retain"].labels)
        return out
