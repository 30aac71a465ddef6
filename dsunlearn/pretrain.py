"""``dsunlearn pretrain``: train a causal LM from scratch with the same engine and loop as unlearning.

The demo world uses it to build its original model (corpus + forget set, the forget set repeated) and the exact
retrain twin (the same corpus without the forget set), both deterministic from ``train.seed``.

    python -m dsunlearn pretrain --config run.json --zero ds_configs/zero3_cpu_test.json \
        --set model.init=random --set data.train=corpus.jsonl
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import ConfigError, RunConfig
from .methods.base import Method
from .methods.terms import token_nll


@dataclass(frozen=True, kw_only=True)
class LanguageModeling(Method):
    """Plain next-token descent on the ``train`` stream: loss = NLL(train)."""
    streams: ClassVar = ("train",)
    citation: ClassVar = "standard causal language modelling"

    def terms(self, outputs):
        train = outputs["train"]
        return {"train": token_nll(train.logits, train.labels)}


def pretrain(cfg: RunConfig, zero_path: str, overwrite: bool = False, resume: bool = False) -> int:
    from .loop import unlearn
    if not cfg.data.train:
        raise ConfigError("data.train: required by pretrain (the training corpus)")
    return unlearn(cfg, zero_path, overwrite=overwrite, resume=resume, method=LanguageModeling())
