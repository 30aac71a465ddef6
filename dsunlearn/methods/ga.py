"""Gradient ascent (GA): push the forget set's likelihood down.

Jang et al., "Knowledge Unlearning for Mitigating Privacy Risks in Language Models", ACL 2023 (arXiv:2210.01504);
method 1 of Yao et al., "Machine Unlearning of Pre-trained Large Language Models", ACL 2024 (arXiv:2402.15159).

    loss = -NLL(forget)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method
from .terms import token_nll


@dataclass(frozen=True, kw_only=True)
class GradientAscent(Method):
    citation: ClassVar = "Jang et al. 2023 (arXiv:2210.01504); Yao et al. 2024 (arXiv:2402.15159)"

    def terms(self, outputs):
        forget = outputs["forget"]
        return {"forget": -token_nll(forget.logits, forget.labels)}
