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
from pathlib import Path
from typing import Any, Optional

from . import engine as E
from .adapter import check_adapter
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
    audits: tuple = ()
    """The audits this run will do (``eval.audits``, or ``dsunlearn audit``'s)."""
    relearn_stream: Optional[Stream] = None
    """The relearning audit's fine-tune text (``audit.relearn_data``), tokenised."""
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


RELEARN_SPLITS = ("forget", "retain", "general")


def check_audits(cfg: RunConfig, audits: tuple, world_size: int) -> None:
    """What the audits (``eval/audit.py``) need from the run config and the files, before anything runs."""
    if not audits:
        return
    if not cfg.model.path or cfg.model.init != "pretrained":
        raise ConfigError("the audits compare with the original model: set model.path (a pretrained model)")
    for name in ("forget", "approximate"):
        if not getattr(cfg.data, name) or name not in cfg.eval.splits:
            raise ConfigError(f"the {' and '.join(audits)} audit needs data.{name} and {name!r} in eval.splits "
                              f"(members and non-members of the attacks)")
    a = cfg.audit
    if "relearn" in audits:
        if a.relearn_data in RELEARN_SPLITS:
            if not getattr(cfg.data, a.relearn_data):
                raise ConfigError(f"audit.relearn_data={a.relearn_data!r}: data.{a.relearn_data} is not set")
        elif not Path(a.relearn_data).is_file():
            raise ConfigError(f"audit.relearn_data: {a.relearn_data} not found (expected one of "
                              f"{', '.join(RELEARN_SPLITS)} or a JSONL file)")
        if a.relearn_batch_size % world_size:
            raise ConfigError(f"audit.relearn_batch_size={a.relearn_batch_size}: expected a multiple of the world "
                              f"size {world_size} (every rank takes the same share)")


def prepare(cfg: RunConfig, zero_path: str, world_size: int, *, method=None, train: bool = True,
            load_data: bool = True, audits: Optional[tuple] = None, earlier: Optional[dict] = None) -> Prepared:
    """Resolve and check everything; ``train=False`` for scoring a model (``eval``: no method, no training streams),
    ``load_data=False`` to check names and files without tokenising (``sweep`` checks all its points up front).

    ``method`` overrides the registry lookup (``dsunlearn pretrain`` passes plain language modelling). ``audits``:
    the audits to prepare for (default: ``eval.audits`` when training, none otherwise). ``earlier``: the forget sets
    of earlier removal requests (``{"forget@1": path}``, ``chain.py``), evaluated beside this run's.
    """
    ds_config = resolve_configs(cfg, zero_path, world_size)
    audits = tuple(cfg.eval.audits if audits is None and train else audits or ())
    check_audits(cfg, audits, world_size)
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
        if cfg.adapter.rank > 0:
            check_adapter(model_config, cfg.adapter, method.trainable_params)
    for model_dir in (cfg.eval.retrained_model, cfg.eval.base_model):
        if model_dir:
            E.check_model_dir(with_model(cfg, model_dir))
    if cfg.reference.path:
        E.check_model_dir(with_model(cfg, cfg.reference.path))
    out = Prepared(cfg=cfg, ds_config=ds_config, world_size=world_size, tokenizer=tokenizer,
                   model_config=model_config, method=method, weights=weights, audits=audits)
    if not load_data:
        return out
    eval_sources = {n: getattr(cfg.data, n) for n in cfg.eval.splits if getattr(cfg.data, n, None)}
    if "forget" in cfg.eval.splits:
        eval_sources.update(earlier or {})
    relearn = {}
    if "relearn" in audits:
        d = cfg.audit.relearn_data
        relearn = {"relearn": getattr(cfg.data, d) if d in RELEARN_SPLITS else d}
    with E.main_process_first():  # rank 0 fills the datasets cache, the others read it
        loaded = {path: load_stream(name, path, cfg.data, tokenizer)
                  for name, path in {**sources, **eval_sources, **relearn}.items()}
    if relearn:
        out.relearn_stream = dataclasses.replace(loaded[relearn["relearn"]], name="relearn", fields={})
    # One tokenisation per file; a stream and an evaluation split of the same file share it.
    out.streams = {n: dataclasses.replace(loaded[p], name=n, fields={}) for n, p in sources.items()}
    out.eval_streams = {n: dataclasses.replace(loaded[p], name=n, fields={}) for n, p in eval_sources.items()}
    if train:
        out.num_steps = plan_steps(cfg, out.streams[method.streams[0]].stats.num_chunks, world_size)
    return out
