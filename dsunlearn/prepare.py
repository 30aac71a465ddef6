"""Everything a run needs, resolved and checked before anything runs: one place for ``unlearn``, ``--dry-run``,
``eval`` and ``sweep``, so a check written once cannot be missed by another entry point.

Order: what needs no files (config values: ``config.validate``, already done when the config was loaded), the ZeRO JSON
against the run config, the method and its term weights, the model directory, tokenizer and config.json (and the
method against it: RMU's layer), the retrained twin's directory, then every data file the run will read (tokenised
once; ``datasets`` caches it). No weights are loaded and no process group is needed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from . import engine as E
from .config import ConfigError, RunConfig
from .data import Stream, load_stream, stream_sources
from .methods import build_method, check_method_on_model, term_weights
from .zero import resolve_configs


@dataclass
class Prepared:
    cfg: RunConfig
    ds_config: dict
    world_size: int
    tokenizer: Any
    model_config: Any
    method: Any = None
    weights: dict = field(default_factory=dict)
    streams: dict[str, Stream] = field(default_factory=dict)
    """The method's training streams, tokenised."""
    eval_streams: dict[str, Stream] = field(default_factory=dict)
    """Every configured evaluation split that has data, tokenised."""
    num_steps: Optional[int] = None


def with_model(cfg: RunConfig, path: str) -> RunConfig:
    """The run config pointed at another (pretrained) model directory: the evaluated model, the twin."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path, init="pretrained"))


def plan_steps(cfg: RunConfig, num_chunks: int, world_size: int) -> int:
    """train.num_steps, or enough steps for train.epochs over the method's first stream (the forget set)."""
    if cfg.train.num_steps is not None:
        return cfg.train.num_steps
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    return max(1, math.ceil(cfg.train.epochs * num_chunks / global_batch))


def prepare(cfg: RunConfig, zero_path: str, world_size: int, *, method=None, train: bool = True,
            load_data: bool = True) -> Prepared:
    """Resolve and check everything; ``train=False`` for scoring a model (``eval``: no method, no training streams),
    ``load_data=False`` to check names and files without tokenising (``sweep`` checks all its points up front).

    ``method`` overrides the registry lookup (``dsunlearn pretrain`` passes plain language modelling).
    """
    ds_config = resolve_configs(cfg, zero_path, world_size)
    e = cfg.eval
    if train and e.stop_tolerance > 0 and e.stop_target != "retrained_forget" \
            and not (cfg.data.approximate and "approximate" in e.splits):
        raise ConfigError(f"eval.stop_target={e.stop_target!r} needs data.approximate and 'approximate' in "
                          f"eval.splits")
    weights, sources = {}, {}
    if train:
        method = method or build_method(cfg.method)
        weights = term_weights(method, cfg.method)
        sources = stream_sources(cfg.data, method.streams, cfg.method.name)
    E.check_model_dir(cfg)
    tokenizer = E.load_tokenizer(cfg)
    model_config = E.load_model_config(cfg)
    E.check_model_tokenizer(model_config, tokenizer, cfg.data.seq_len)
    if train:
        check_method_on_model(method, model_config)
    if cfg.eval.retrained_model:
        E.check_model_dir(with_model(cfg, cfg.eval.retrained_model))
    out = Prepared(cfg=cfg, ds_config=ds_config, world_size=world_size, tokenizer=tokenizer,
                   model_config=model_config, method=method, weights=weights)
    if not load_data:
        return out
    eval_sources = {n: getattr(cfg.data, n) for n in cfg.eval.splits if getattr(cfg.data, n, None)}
    with E.main_process_first():  # rank 0 fills the datasets cache, the others read it
        loaded = {path: load_stream(name, path, cfg.data, tokenizer)
                  for name, path in {**sources, **eval_sources}.items()}
    # One tokenisation per file; a stream and an evaluation split of the same file share it.
    out.streams = {n: dataclasses.replace(loaded[p], name=n, fields={}) for n, p in sources.items()}
    out.eval_streams = {n: dataclasses.replace(loaded[p], name=n, fields={}) for n, p in eval_sources.items()}
    if train:
        out.num_steps = plan_steps(cfg, out.streams[method.streams[0]].stats.num_chunks, world_size)
    return out
