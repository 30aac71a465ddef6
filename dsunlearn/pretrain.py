"""``dsunlearn pretrain``: train a causal LM with the same engine and loop as unlearning (from scratch or further).

The demo world uses it to build its original model (corpus + forget set, the forget set repeated) and the exact
retrain twin (the same corpus without the forget set), both deterministic from ``train.seed``. With
``data.forget_per_batch: k`` every micro-step adds k forget chunks to the same train chunks the twin (k = 0) sees:
the last training stage of an original and its exact twin (``dsunlearn.demo.pretrain_pair --base``).

    python -m dsunlearn pretrain --config run.json --zero ds_configs/zero3_cpu_test.json \
        --set model.init=random --set data.train=corpus.jsonl
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .config import ConfigError, RunConfig
from .methods.base import Method
from .methods.terms import chunk_nll, token_nll


@dataclass(frozen=True, kw_only=True)
class LanguageModeling(Method):
    """Plain next-token descent on the ``train`` stream: loss = NLL(train)."""
    streams: ClassVar = ("train",)
    citation: ClassVar = "standard causal language modelling"

    def terms(self, outputs):
        train = outputs["train"]
        return {"train": token_nll(train.logits, train.labels)}


@dataclass(frozen=True, kw_only=True)
class LanguageModelingWithForget(LanguageModeling):
    """Next-token descent on the train chunks plus ``forget_per_batch`` forget chunks, one fused batch:
    loss = mean over all B + k chunks of each chunk's mean NLL.

    Removing the forget chunks leaves exactly the twin's loss on the same B train chunks (``LanguageModeling``): the
    train stream's sampler is the first stream's in both runs, so its chunks per step are the same (loop.build_run).
    """
    streams: ClassVar = ("train", "forget")
    forget_per_batch: int

    @property
    def term_names(self) -> tuple[str, ...]:
        return ("train",)

    def stream_batch_size(self, stream: str, train) -> int:
        return self.forget_per_batch if stream == "forget" else super().stream_batch_size(stream, train)

    def terms(self, outputs):
        per_chunk = torch.cat([chunk_nll(o.logits, o.labels) for o in (outputs["train"], outputs["forget"])])
        return {"train": per_chunk.mean()}


def pretraining_method(cfg: RunConfig) -> LanguageModeling:
    """The method ``dsunlearn pretrain`` runs: the train corpus alone, or with ``data.forget_per_batch`` forget chunks."""
    if not cfg.data.train:
        raise ConfigError("data.train: required by pretrain (the training corpus)")
    k = cfg.data.forget_per_batch
    if k and not cfg.data.forget:
        raise ConfigError(f"data.forget_per_batch={k} needs data.forget (the forget set mixed into every batch)")
    if cfg.data.forget and not k:
        raise ConfigError("data.forget is set but data.forget_per_batch is 0: set how many forget chunks each "
                          "micro-step adds (an original), or drop data.forget (its twin)")
    return LanguageModelingWithForget(forget_per_batch=k) if k else LanguageModeling()


def pretrain(cfg: RunConfig, zero_path: str, overwrite: bool = False, resume: bool = False) -> int:
    from .loop import unlearn
    return unlearn(cfg, zero_path, overwrite=overwrite, resume=resume, method=pretraining_method(cfg))
