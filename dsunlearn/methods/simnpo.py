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

from .base import OptionalRetainNLL
from .terms import simnpo_loss


@dataclass(frozen=True, kw_only=True)
class SimNPO(OptionalRetainNLL):
    beta: float = 0.7
    """Inverse temperature on the length-normalised log-likelihood (paper, MUSE-Books: 0.7)."""
    gamma: float = 0.0
    """Reward margin inside the sigmoid, added after the beta scaling (paper, MUSE-Books: 0; MUSE-News: 2.25 = 0.75 x
    the released code's 3.0). Larger values keep pushing already-forgotten chunks."""
    retain_loss: str = "nll"
    """"nll" (the paper's regularised SimNPO) or "none"."""

    reference: ClassVar = {}
    default_weights: ClassVar = {"retain": 0.1}
    needs_hidden_states: ClassVar = False
    citation: ClassVar = "Fan et al. 2024 (arXiv:2410.07163)"

    def terms(self, outputs):
        forget = outputs["forget"]
        out = {"forget": simnpo_loss(forget.logits, forget.labels, self.beta, self.gamma)}
        return self.with_retain(outputs, out)
