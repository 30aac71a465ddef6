"""GA + KL: ascend on the forget set, keep the retain distribution close to theta_0's.

Yao et al., "Machine Unlearning of Pre-trained Large Language Models", ACL 2024 (arXiv:2402.15159), methods 5 (retain
data from the forget set's domain, ``data.retain_source = "retain"``) and 7 (general data, ``"general"``).

    loss = -NLL(forget) + KL(p_theta0 || p_theta)(retain)

The KL is per next-token position, averaged over each chunk's non-pad positions, then over chunks. theta_0 comes
from ``reference.mode``: a frozen engine (exact KL) or a cache of its top-k log-probs plus the remaining mass
(exact when ``reference.topk`` >= vocabulary; otherwise a lower bound, see ``terms.kl_to_reference``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method
from .terms import kl_to_reference, token_nll


@dataclass(frozen=True, kw_only=True)
class GradKL(Method):
    streams: ClassVar = ("forget", "retain")
    reference: ClassVar = {"retain": "logits"}
    citation: ClassVar = "Yao et al. 2024 (arXiv:2402.15159), methods 5 and 7"

    def terms(self, outputs):
        forget, retain = outputs["forget"], outputs["retain"]
        ref = retain.reference
        return {"forget": -token_nll(forget.logits, forget.labels),
                "retain": kl_to_reference(retain.logits, retain.labels, ref.topk_logprobs, ref.topk_ids,
                                          ref.rest_logmass)}
