"""Random labels: fine-tune on the forget set with every label replaced by a random token.

Method 2 of Yao et al., "Machine Unlearning of Pre-trained Large Language Models", ACL 2024 (arXiv:2402.15159).

    loss = NLL(forget, random labels)

The labels are drawn once, uniformly over the tokenizer's non-special ids, with ``train.seed``; special tokens (EOS,
BOS, ...) keep their true label and padding stays masked. They are stored beside the data (``reference.py``) and
reused by every step, rank and resumed run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method
from .terms import token_nll


@dataclass(frozen=True, kw_only=True)
class RandomLabels(Method):
    precomputed: ClassVar = {"forget": "random_labels"}
    citation: ClassVar = "Yao et al. 2024 (arXiv:2402.15159), method 2"

    def terms(self, outputs):
        forget = outputs["forget"]
        return {"forget": token_nll(forget.logits, forget.extra["random_labels"])}
