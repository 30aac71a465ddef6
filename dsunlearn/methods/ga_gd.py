"""GA + GD: ascend on the forget set, descend on retain data.

Yao et al., "Machine Unlearning of Pre-trained Large Language Models", ACL 2024 (arXiv:2402.15159), methods 4 (retain
data from the forget set's domain, ``data.retain_source = "retain"``) and 6 (general data, ``"general"``). The study
found it the most robust of the seven to hyperparameters.

    loss = -NLL(forget) + NLL(retain)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method
from .terms import token_nll


@dataclass(frozen=True, kw_only=True)
class GradDiff(Method):
    streams: ClassVar = ("forget", "retain")
    citation: ClassVar = "Yao et al. 2024 (arXiv:2402.15159)"

    def terms(self, outputs):
        forget, retain = outputs["forget"], outputs["retain"]
        return {"forget": -token_nll(forget.logits, forget.labels),
                "retain": token_nll(retain.logits, retain.labels)}
