"""The phase machinery: a phased method's earlier phases (``methods/phased.py``), each to a boundary, resumable in any
phase; its last phase is the run itself (``loop.unlearn``).

    RUN_DIR/phases/<k>-<name>/model/       the boundary after phase k: a safetensors model directory
    RUN_DIR/phases/<k>-<name>/phase.json   written last: phase k is complete (kind, FLOPs, seconds, peak memory)
    RUN_DIR/phases/<k>-<name>/log.jsonl    a train phase's own run (every line labelled with the phase), tb/,
                                           checkpoints/ (every ``checkpoint.every_n_steps``), summary.json

Kinds and where they run:
- train: a run of its own (``loop.unlearn`` with the phase's method and knobs) under the run's ZeRO JSON on every
  rank, from the previous boundary; its ``model/`` is the boundary. A kill resumes it from its last checkpoint.
- edit, arithmetic: rank 0 rewrites the previous boundary tensor by tensor, one safetensors shard in memory at a
  time, into a temporary directory swapped in whole (``engine.replace_dir``); the other ranks learn the outcome
  (``engine.together``). No optimizer and no forward: their FLOPs are those of a few elementwise passes, counted as 0.
A resumed run skips every phase with a ``phase.json`` and runs the first one without it again (a train phase from its
checkpoint). The last phase (the run's own training, or ``HOLD``) loads the last boundary; the run's evaluations,
audits and chain compare with the run's own model, never with a boundary.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import engine as E
from .config import AdapterConfig, ConfigError, MethodConfig
from .data import write_json_atomic
from .methods import term_weights
from .methods.phased import (INPUT, ArithmeticPhase, EditContext, EditPhase, PhasedMethod, TrainPhase, phase_lr)
from .prepare import Prepared, plan_steps, with_model

log = logging.getLogger(__name__)

AFTER_PHASES = "after phases"
"""The label of the evaluation of the last boundary, before the run's own training (a candidate for the export)."""


def is_phased(method) -> bool:
    return isinstance(method, PhasedMethod)


@dataclass
class Earlier:
    """What the earlier phases left: each boundary's directory and each phase's record."""
    boundaries: dict = field(default_factory=dict)
    records: list = field(default_factory=list)



def check(p: Prepared) -> bool:
    """Is the run phased? What a phased run needs beyond ``prepare``'s checks, before the run directory is touched."""
    cfg, method = p.cfg, p.method
    if not is_phased(method):
        return False
    if cfg.adapter.rank > 0:
        raise ConfigError(f"adapter.rank={cfg.adapter.rank}: method {cfg.method.name!r} works in phases on the full "
                          f"weights (edits and task arithmetic need them); set adapter.rank=0")
    for ph in method.earlier_phases():  # a method's own bug, not the user's: said before anything runs
        if isinstance(ph, TrainPhase) and ph.keep_off is not None:
            raise ConfigError(f"method {cfg.method.name!r}: phase {ph.name!r} keeps off a direction, which only the "
                              f"run's own training (the last phase) can")
    for ph in method.phases():
        if isinstance(ph, TrainPhase) and ph.num_steps is not None and ph.global_batch % p.world_size:
            raise ConfigError(f"method.params: phase {ph.name!r} takes {ph.global_batch} chunks a step, not a "
                              f"multiple of the world size {p.world_size}")
        if isinstance(ph, TrainPhase) and ph.teacher is not None:
            if cfg.reference.mode == "cache":
                raise ConfigError(f"reference.mode='cache': phase {ph.name!r} distils from the boundary "
                                  f"{ph.teacher!r}, which needs a frozen engine (reference.mode 'engine' or 'auto')")
            if cfg.reference.path:
                raise ConfigError(f"reference.path={cfg.reference.path}: phase {ph.name!r} of {cfg.method.name!r} "
                                  f"sets its own reference (the boundary {ph.teacher!r}); leave reference.path unset")
    return True


def run_phased(p: Prepared, zero_path: str, resume: bool, unlearn: Callable) -> tuple:
    """The earlier phases (``run_earlier_phases``; ``unlearn``: ``loop.unlearn``, which runs each train phase), then
    what the last phase needs: its prepared run, what its engines load (``final_prepared``), the earlier phases'
    records (for the cost), its name (for the log) and the boundaries' directories (``keep_off``)."""
    earlier = run_earlier_phases(p, zero_path, resume, unlearn)
    E.reset_peak_memory()  # summary.json's peak is the last phase's
    run_p, engine_p = final_prepared(p, earlier)
    return run_p, engine_p, earlier.records, p.method.final_phase().name, earlier.boundaries


def phase_dirs(run_dir: str, method: PhasedMethod) -> list[Path]:
    return [Path(run_dir) / "phases" / f"{k}-{ph.name}" for k, ph in enumerate(method.earlier_phases(), start=1)]


def run_earlier_phases(p: Prepared, zero_path: str, resume: bool, unlearn: Callable) -> Earlier:
    """Every phase before the run's own training, in order; a complete one (``phase.json``) is not run again."""
    method, run_dir = p.method, p.cfg.output.run_dir
    done = Earlier(boundaries={INPUT: p.cfg.model.path})
    previous = p.cfg.model.path
    for k, (ph, out) in enumerate(zip(method.earlier_phases(), phase_dirs(run_dir, method)), start=1):
        marker = out / "phase.json"
        if resume and marker.is_file():
            record = json.loads(marker.read_text())
        else:
            if E.is_main():
                log.info("phase %d/%d %s (%s)", k, len(method.phases()), ph.name, ph.kind)
            started = time.perf_counter()
            E.reset_peak_memory()
            notes: dict = {}
            if isinstance(ph, TrainPhase):
                flops = train_phase(p, ph, previous, out, done.boundaries, zero_path, resume, unlearn)
            else:
                with E.together(f"phase {ph.name}"):
                    if E.is_main():
                        notes = rewrite_phase(p, ph, Path(previous), out / "model", done.boundaries)
                flops = 0.0
            record = {"phase": ph.name, "kind": ph.kind, "index": k, "flops": flops,
                      "seconds": round(time.perf_counter() - started, 3), "peak_memory_bytes": E.peak_memory(),
                      "boundary_bytes": dir_bytes(out / "model"), "world_size": E.world_size(),
                      **({"notes": notes} if notes else {})}
            with E.together(f"recording phase {ph.name}"):
                if E.is_main():
                    write_json_atomic(marker, record)
        done.records.append(record)
        done.boundaries[ph.name] = previous = str(out / "model")
    return done


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def phase_config(cfg, ph: TrainPhase, model_path: str, out: Path, boundaries: dict, world_size: int):
    """The run config of one train phase: the phase's knobs, no evaluation, its boundary exported."""
    reference = cfg.reference
    if ph.teacher is not None:
        reference = dataclasses.replace(reference, mode="engine", path=boundaries[ph.teacher])
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=model_path, init="pretrained"),
        method=MethodConfig(name=f"{cfg.method.name}/{ph.name}"), reference=reference, adapter=AdapterConfig(),
        train=dataclasses.replace(cfg.train, lr=phase_lr(ph, cfg.train.lr), schedule=ph.schedule, warmup_ratio=0.0, min_lr_ratio=0.0,
                                  micro_batch_size=ph.global_batch // world_size, grad_accum=1,
                                  global_batch_size=None, retain_ratio=1, num_steps=ph.num_steps),
        eval=dataclasses.replace(cfg.eval, splits=(), every_n_steps=0, stop_tolerance=0.0, audits=(),
                                 retrained_model=None),
        output=dataclasses.replace(cfg.output, run_dir=str(out), save_model=True))


def train_phase(p: Prepared, ph: TrainPhase, model_path: str, out: Path, boundaries: dict, zero_path: str,
                resume: bool, unlearn: Callable) -> float:
    """One train phase as a run of its own (``unlearn``); returns its FLOPs. A killed one resumes from its
    checkpoint."""
    sub = phase_config(p.cfg, ph, model_path, out, boundaries, p.world_size)
    again = resume and (out / "checkpoints" / "latest.json").is_file()
    code = unlearn(sub, zero_path, overwrite=not again, resume=again, method=ph.method, phase=ph.name)
    E.release_engines()
    summary = json.loads((out / "summary.json").read_text()) if E.is_main() else None
    summary = E.broadcast_object(summary)
    if code != 0 or not summary["model_exported"]:
        raise PhaseStopped(f"phase {ph.name!r} stopped ({summary['stop_reason'] or 'exit code ' + str(code)}); "
                           f"its run: {out}", code)
    return float(summary["cost"]["unlearning_flops"])


class PhaseStopped(RuntimeError):
    """A train phase ended without a boundary (divergence guard, non-finite loss): the run stops there."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def edit_context(p: Prepared, ph: EditPhase) -> EditContext:
    """Token counts of the streams an edit reads; the input embedding's parameter name; the initializer range."""
    from .cost import meta_model
    model = meta_model(p.model_config)
    emb = model.get_input_embeddings().weight
    embedding = next(n for n, q in model.named_parameters() if q is emb)
    vocab = int(emb.shape[0])
    counts = {}
    for name in ph.statistics:
        counts[name] = chunk_counts(p.streams[name].chunks, vocab)  # the chunks as trained: what the rows saw
    nulls = null_counts(p.streams["retain"].chunks, int(counts["forget"].sum()), counts["retain"], ph.null_draws,
                        p.cfg.train.seed, vocab) if ph.null_draws else ()
    base = None
    if ph.base_rows and p.cfg.eval.base_model:  # the rows as they were before the forget set was learnt
        try:
            base = Tensors(Path(p.cfg.eval.base_model))[embedding]
        except RuntimeError as e:
            raise ConfigError(f"eval.base_model: {e}") from None
    return EditContext(token_counts=counts, embedding=embedding,
                       init_std=float(getattr(p.model_config, "initializer_range", 0.02)), seed=p.cfg.train.seed,
                       null_counts=nulls, base_embedding=base)


def chunk_counts(chunks, vocab: int) -> torch.Tensor:
    """Token counts ([vocab] int64) over a stream's chunks (a ``datasets.Dataset``), 1024 chunks at a time."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for batch in chunks.iter(batch_size=1024):
        ids = torch.tensor([t for chunk in batch["input_ids"] for t in chunk], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab)[:vocab]
    return counts


def null_counts(retain, forget_tokens: int, retain_counts: torch.Tensor, draws: int, seed: int,
                vocab: int) -> tuple:
    """``draws`` random retain samples as large as the forget stream, each with the counts of the rest of the retain
    stream: the same statistics as (forget, retain) for text that is not the forget set. Whole documents are drawn
    (seeded), as the forget set is a set of documents: a document's rare tokens come together, and chunks drawn
    from all over would scatter them and understate the null."""
    chunks_of: dict = {}  # document -> its chunk indices, and its token count: one pass over the stream
    tokens_of: dict = {}
    i = 0
    for batch in retain.iter(batch_size=1024):
        for d, ids in zip(batch["doc_index"], batch["input_ids"]):
            chunks_of.setdefault(d, []).append(i)
            tokens_of[d] = tokens_of.get(d, 0) + len(ids)
            i += 1
    order_docs = sorted(chunks_of)
    out = []
    for draw in range(draws):
        order = torch.randperm(len(order_docs), generator=torch.Generator().manual_seed(seed * 1009 + draw)).tolist()
        picked, tokens = [], 0
        for j in order:
            if tokens >= forget_tokens:
                break
            picked += chunks_of[order_docs[j]]
            tokens += tokens_of[order_docs[j]]
        sample = chunk_counts(retain.select(sorted(picked)), vocab)
        out.append((sample, retain_counts - sample))
    return tuple(out)


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir}: no *.safetensors weights (phased methods read safetensors only)")
    return files


def rewrite(src: Path, dst: Path, transform: Callable[[str, torch.Tensor], Optional[torch.Tensor]]) -> None:
    """``dst`` = ``src`` with every weight tensor passed through ``transform`` (None: kept), one shard at a time;
    the other files (config, tokenizer, shard index) copied. Written whole or not at all."""
    from safetensors.torch import load_file, save_file

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        for shard in weight_files(src):
            tensors = load_file(str(shard))
            out = {}
            for name, tensor in tensors.items():
                new = transform(name, tensor)
                if new is not None and (new.shape != tensor.shape or new.dtype != tensor.dtype):
                    raise RuntimeError(f"edit of {name}: {tuple(new.shape)} {new.dtype}, expected "
                                       f"{tuple(tensor.shape)} {tensor.dtype}")
                out[name] = (tensor if new is None else new).contiguous()
            save_file(out, str(tmp / shard.name), metadata={"format": "pt"})
            del tensors, out
    E.replace_dir(dst, write)


class Tensors:
    """Read-only access to a boundary's tensors by name, across its shards (one tensor in memory at a time)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open
        self.handles = [safe_open(str(f), framework="pt") for f in weight_files(model_dir)]
        self.where = {k: h for h in self.handles for k in h.keys()}
        self.model_dir = model_dir

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise RuntimeError(f"{self.model_dir}: no tensor {name!r} (boundaries of different models?)")
        return self.where[name].get_tensor(name)


def rewrite_phase(p: Prepared, ph, src: Path, dst: Path, boundaries: dict) -> dict:
    """An edit or arithmetic phase on rank 0: ``src`` (the previous boundary) into ``dst``; returns the edit's
    notes (``EditContext.notes``)."""
    if isinstance(ph, EditPhase):
        ctx = edit_context(p, ph)
        rewrite(src, dst, lambda name, t: ph.edit(name, t, ctx))
        return ctx.notes
    if isinstance(ph, ArithmeticPhase):
        from .methods.phased import negate
        base, moved = Tensors(Path(boundaries[ph.base])), Tensors(Path(boundaries[ph.moved]))
        # In the dtype of the boundary it replaces: a bf16 engine writes bf16 boundaries after an fp32 input model
        # (the negation itself is computed in fp32 at least).
        rewrite(src, dst, lambda name, t: negate(base[name], moved[name], ph.beta).to(t.dtype))
        return {}
    raise TypeError(f"unknown phase kind {ph!r}")  # pragma: no cover - phased.py defines the kinds


def final_prepared(p: Prepared, earlier: Earlier) -> tuple[Prepared, Prepared]:
    """The last phase's run, and what its engines load: the last boundary (and a teacher boundary as reference)."""
    final = p.method.final_phase()
    cfg = p.cfg
    streams = final.method.streams
    steps = 0 if final.num_steps == 0 else plan_steps(cfg, p.streams[streams[0]].stats.num_chunks, p.world_size)
    run_p = dataclasses.replace(p, method=final.method, weights=term_weights(final.method, cfg.method),
                                streams={n: p.streams[n] for n in streams}, num_steps=steps)
    last = list(earlier.boundaries.values())[-1]
    engine_cfg = with_model(cfg, last)
    if final.teacher is not None:
        engine_cfg = dataclasses.replace(engine_cfg, reference=dataclasses.replace(
            cfg.reference, mode="engine", path=earlier.boundaries[final.teacher]))
    return run_p, dataclasses.replace(run_p, cfg=engine_cfg)


