"""Adversarial labels: fine-tune on the forget set toward theta_0's best wrong guess.

Method 3 of Yao et al., "Machine Unlearning of Pre-trained Large Language Models", ACL 2024 (arXiv:2402.15159).

    loss = NLL(forget, adversarial labels),  adversarial target at t+1 = argmax_{v != y_t+1} p_theta0(v | y_<=t)

The logits at position t predict token t+1, so the true token t+1 is the one excluded (the study's released code
excluded token t, aiming at the guess two positions ahead). Special tokens are never a target either, and a true
special target keeps its label, as with random labels (``terms.adversarial_targets``). Computed once by a
distributed no-grad pass of theta_0 (every rank a shard of the forget chunks, gathered), stored beside the data and
reused (``reference.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method
from .terms import token_nll


@dataclass(frozen=True, kw_only=True)
class AdversarialLabels(Method):
    precomputed: ClassVar = {"forget": "adversarial_labels"}
    citation: ClassVar = "Yao et al. 2024 (arXiv:2402.15159), method 3"

    def terms(self, outputs):
        forget = outputs["forget"]
        return {"forget": token_nll(forget.logits, forget.extra["adversarial_labels"])}
