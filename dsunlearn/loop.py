"""The one unlearning loop.

Per micro-step: the chunks of every stream the method declares are concatenated into ONE batch, the engine runs ONE
forward, each stream gets its slice of the logits, the method returns named loss terms, the loop weighs and sums them
and calls ``engine.backward`` once and ``engine.step`` once. Under ZeRO-3 every forward is a full parameter
all-gather, and DeepSpeed 0.19 refuses a second forward before a backward when timers are on.

    deepspeed --num_gpus 8 --module dsunlearn unlearn --config run.json --zero ds_configs/zero3.json

``prepare.prepare`` resolves and checks a run; ``rundir`` keeps its directory, log and checkpoints.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from . import engine as E
from . import chain as C
from . import phases as P
from . import reference as R
from .adapter import apply_adapter
from .config import RunConfig
from .cost import KNOWN_PRETRAINING, ModelShape, run_cost, run_passes
from .data import Stream, StreamSampler
from .eval.audit import run_audits
from .eval.runner import Evaluator
from .finish import finish_run
from .keep_off import keep_off_hook
from .methods import select_trainable
from .methods.base import StreamOutputs
from .methods.terms import chunk_nll, split_streams
from .prepare import Prepared, prepare
from .rundir import (RunLogger, RunState, claim_run_dir, has_checkpoint, restore_last_good, resume_from_checkpoint,
                     save_checkpoint, write_run_files)

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIVERGED, EXIT_UNJUDGED = 0, 3, 4
"""Exit codes of an unlearning run (docs/reliability.md): 3 = stopped by the divergence guard; 4 = stopped before
the first step because its own evaluation cannot judge the forget set (``Evaluator.unjudged_refusal``)."""

RELEASE_MEMO_STEPS = 2
"""Optimizer steps after no-grad forwards on the trained engine (cache passes, evaluations) that first clear DeepSpeed
0.19.8's stale ZeRO-3 release memo (``engine.forget_zero3_release_decisions``): one is not enough, every step costs
~12% of a step (``benchmarks/RESULTS.md`` section 8)."""


@dataclass
class Run:
    """What every step of one run reads: the trained engine, the method and its weights, the data, theta_0."""
    cfg: RunConfig
    engine: Any
    method: Any
    weights: dict[str, float]
    streams: dict[str, Stream]
    samplers: dict[str, StreamSampler]
    reference: Any
    pad_id: int
    earlier: tuple = ()
    """A phased method's earlier phases (``phases.py`` records): their FLOPs are in the cost."""
    release_memo_steps: int = RELEASE_MEMO_STEPS
    """Steps left that clear the ZeRO-3 release memo first (``RELEASE_MEMO_STEPS``); reset after every evaluation."""
    after_step: Any = None  # called after every optimizer step (keep_off.KeepOff: a phase kept off a direction)


def plan_cost(run: Run, state: RunState) -> dict:
    """Analytic FLOPs of this run (every pass the method makes) and the retraining comparison (dsunlearn.cost)."""
    cfg, method, streams = run.cfg, run.method, run.streams
    t, seq, world = cfg.train, cfg.data.seq_len, E.world_size()
    per_step = {n: method.stream_batch_size(n, t) * t.grad_accum * world * seq for n in streams}
    reference = tuple(method.reference)
    one_time = 0
    if reference and cfg.reference.mode == "cache":
        one_time += sum(streams[n].stats.num_chunks * seq for n in reference)
    for n, kind in method.precomputed.items():
        if kind != "random_labels":  # adversarial labels: one theta_0 forward over the stream
            one_time += streams[n].stats.num_chunks * seq
    pretrain_tokens = cfg.cost.pretrain_tokens
    if pretrain_tokens is None and cfg.cost.known_model:  # config.validate has checked the key
        pretrain_tokens = KNOWN_PRETRAINING[cfg.cost.known_model][1]
    tokens_per_s = state.tokens / state.seconds if state.seconds else None
    return run_cost(ModelShape.from_model(run.engine.module), seq,
                    run_passes(per_step, reference, cfg.reference.mode, adapter=cfg.adapter.rank > 0),
                    state.step, one_time, pretrain_tokens, tokens_per_s, state.tokens or None,
                    earlier_phases=run.earlier)


def fused_forward(engine, method, streams: dict[str, dict], reference=None) -> dict[str, StreamOutputs]:
    """Concatenate every stream into one batch, run one forward, hand each stream its slice.

    theta_0's outputs (``reference.outputs_for``) are taken first: a reference engine's forward then peaks before the
    trained forward's activations exist instead of on top of them, and only what the method needs is kept.
    """
    names = list(streams)
    refs = reference.outputs_for(streams, E.device()) if reference is not None else {}
    sizes = [streams[n]["input_ids"].size(0) for n in names]
    fused = {k: torch.cat([streams[n][k] for n in names]) for k in ("input_ids", "attention_mask", "labels")}
    out = E.forward(engine, fused, output_hidden_states=method.needs_hidden_states)
    logits = split_streams(out.logits, sizes)  # one shared gradient for all streams' rows
    hidden = [h.split(sizes) for h in out.hidden_states] if method.needs_hidden_states else None
    dev = out.logits.device
    outputs = {}
    for i, n in enumerate(names):
        s = streams[n]
        outputs[n] = StreamOutputs(
            logits=logits[i], labels=s["labels"].to(dev), input_ids=s["input_ids"].to(dev),
            extra={k: v.to(dev) if torch.is_tensor(v) else v for k, v in s.items()
                   if k not in ("input_ids", "attention_mask", "labels")},
            hidden_states=tuple(h[i] for h in hidden) if hidden else None, reference=refs.get(n))
    return outputs


def build_run(p: Prepared, reference_factory=None) -> Run:
    """The trained engine (theta_0's weights until its first step), precomputed labels, theta_0's reference, samplers."""
    cfg, method = p.cfg, p.method
    model, _hf_ds_handle = E.load_model(cfg, p.ds_config)
    if cfg.adapter.rank > 0:  # LoRA: only the adapters train (RMU's adapt the layers it would train)
        model = apply_adapter(model, cfg.adapter, method.trainable_params, seed=cfg.train.seed)
        method.check_trainable([n for n, q in model.named_parameters() if q.requires_grad])
    else:
        select_trainable(model, method)  # RMU trains a few matrices: frozen before DeepSpeed sees the parameters
    engine = E.build_train_engine(model, p.ds_config, cfg, p.num_steps)
    # Until its first step (or a resume's checkpoint load) the engine holds theta_0: precomputed labels and reference
    # caches are computed from it, so reference.mode="cache" never has a second model in memory.
    R.attach_precomputed(cfg, method, engine, p.streams, p.tokenizer)
    reference = (reference_factory or R.build_reference)(cfg, p.ds_config, method, engine, p.streams, p.tokenizer)
    t = cfg.train
    samplers = {name: StreamSampler(num_chunks=s.stats.num_chunks, per_rank=method.stream_batch_size(name, t),
                                    grad_accum=t.grad_accum, world_size=p.world_size, seed=t.seed + 1009 * i)
                for i, (name, s) in enumerate(p.streams.items())}
    return Run(cfg=cfg, engine=engine, method=method, weights=p.weights, streams=p.streams, samplers=samplers,
               reference=reference, pad_id=p.tokenizer.pad_token_id)


def unlearn(cfg: RunConfig, zero_path: str, overwrite: bool = False, resume: bool = False,
            reference_factory=None, method=None, after: Optional[str] = None, phase: Optional[str] = None) -> int:
    """Run one unlearning job end to end. Returns the process exit code.

    ``method`` overrides the registry lookup (``dsunlearn pretrain``: plain language modelling; ``phases.py``: a
    phase's method, ``phase`` its name). ``after``: the previous removal request's run dir (``chain.py``)."""
    started = time.time()
    E.init_distributed()
    run_dir = cfg.output.run_dir
    chain = None  # unlearning (not pretraining) records its chain of removal requests
    if method is None and resume:
        chain = C.recorded_chain(Path(run_dir))
    elif method is None:
        cfg, chain = C.plan_request(cfg, after)
    earlier = C.earlier_forget_sets(chain) if chain else {}
    # Everything checkable, before the run dir is touched.
    p = prepare(cfg, zero_path, E.world_size(), method=method, earlier=earlier)
    phased = P.check(p)
    claim_run_dir(run_dir, overwrite, resume)
    write_run_files(p, zero_path, resume)
    if chain is not None and not resume:
        C.write_chain(run_dir, chain)
    engine_p, earlier, boundaries, phased_method = p, (), {}, p.method
    if phased:  # the earlier phases, each to a boundary; the rest of this function is the last phase
        try:
            p, engine_p, earlier, phase, boundaries = P.run_phased(p, zero_path, resume, unlearn)
        except P.PhaseStopped as e:
            log.error("%s", e)
            return e.exit_code
    resume = resume and has_checkpoint(run_dir)  # a phased run killed in an earlier phase starts its last afresh
    run = build_run(engine_p, reference_factory)
    run.cfg, run.earlier, run.after_step = cfg, earlier, keep_off_hook(phased_method, boundaries, run.engine, resume)
    state = RunState()
    if resume:
        resume_from_checkpoint(run.engine, run_dir, state)
    pretraining = p.method.streams[:1] == ("train",)
    logger = RunLogger(run_dir, p.num_steps, state.step, E.is_main(), desc="pretrain" if pretraining else "unlearn",
                       phase=phase)
    evaluator = None
    if not pretraining and p.eval_streams:
        later_request = chain is not None and len(chain["requests"]) > 1
        evaluator = Evaluator(cfg, run.engine, p.tokenizer, logger, p.ds_config, run_dir, p.eval_streams,
                              resume_step=state.step if resume else None,
                              original_model=chain["original"]["path"] if later_request else None,
                              before_model=cfg.model.path if phased else None)
        if not resume:
            evaluator.evaluate_before()
        if phased and not evaluator.evaluated(P.AFTER_PHASES):  # the last boundary: a candidate for the export
            evaluator.evaluate(0, label=P.AFTER_PHASES)
    try:
        if evaluator is not None and not resume and (refusal := evaluator.unjudged_refusal()):
            # Nothing to remove, by the run's own judgement: no step is taken and nothing is exported.
            state.stop_reason = refusal
            if E.is_main():
                log.error("stopping before the first step: %s", refusal)
            exit_code, weights_ok = EXIT_UNJUDGED, False
        else:
            exit_code, weights_ok = train(run, state, p.num_steps, logger, evaluator)
        audit = (lambda model_dir, original: run_audits(p, model_dir, cfg.eval.retrained_model, original)) \
            if p.audits else None
        finish_run(run, state, p.num_steps, exit_code, logger, evaluator, started, plan_cost=plan_cost,
                   tokenizer=p.tokenizer, export=cfg.output.save_model and weights_ok, audit=audit, chain=chain)
    finally:
        logger.close()
    return exit_code


def train(run: Run, state: RunState, num_steps: int, logger: RunLogger, evaluator: Optional[Evaluator]):
    """Optimizer steps until ``num_steps``, a stop rule or the divergence guard. Returns (exit code, weights ok)."""
    cfg, run_dir = run.cfg, run.cfg.output.run_dir
    run.engine.train()
    while state.step < num_steps:
        record = train_step(run, state.step)
        if run.after_step is not None and not record["stop"]:
            run.after_step()
        if record["stop"]:
            state.stop_reason = record["stop"]
            if E.is_main():
                log.error("stopping at step %d: %s", state.step + 1, state.stop_reason)
            return EXIT_DIVERGED, (restore_last_good(run.engine, run_dir, state) if record.get("weights_corrupt")
                                   else True)
        state.step += 1
        state.tokens += int(round(record["tokens_per_s"] * record["step_seconds"]))
        state.seconds += record["step_seconds"]
        state.skipped_steps += record["skipped"]
        state.consecutive_skips = state.consecutive_skips + 1 if record["skipped"] else 0
        if record["skipped"] and E.is_main():
            log.warning("step %d skipped: non-finite gradient (weights and optimizer states unchanged)", state.step)
        logger.step({"step": state.step, **{k: v for k, v in record.items() if k != "stop"},
                     "skipped_steps": state.skipped_steps, "consecutive_skips": state.consecutive_skips})
        if cfg.guard.stop_on_nonfinite and state.consecutive_skips >= cfg.guard.max_consecutive_skips:
            first = state.step - state.consecutive_skips + 1
            state.stop_reason = (f"{state.consecutive_skips} consecutive optimizer steps skipped for non-finite "
                                 f"gradients (steps {first}-{state.step}); the weights are those after step "
                                 f"{first - 1}")
            if E.is_main():
                log.error("stopping: %s", state.stop_reason)
            return EXIT_DIVERGED, True
        if cfg.checkpoint.every_n_steps and state.step % cfg.checkpoint.every_n_steps == 0 and state.step < num_steps:
            save_checkpoint(run.engine, run_dir, state.step, cfg.checkpoint.keep_last)
        if evaluator is not None and cfg.eval.every_n_steps and state.step % cfg.eval.every_n_steps == 0:
            decision = evaluator.evaluate(state.step, label=f"step {state.step}")
            run.release_memo_steps = RELEASE_MEMO_STEPS  # its no-grad forwards left a stale ZeRO-3 release memo
            if decision == "stop":
                state.stop_reason = "stop rule: the forget loss reached the target"
                break
    return EXIT_OK, True


def train_step(run: Run, step: int) -> dict:
    """One optimizer step (grad_accum micro-steps). Returns rank-averaged scalars, ``skipped`` and a stop reason.

    Before each backward, a forget NLL above ``guard.forget_loss_ceiling`` stops the run *before* the update, so the
    engine still holds the last good weights. A non-finite loss goes through: DeepSpeed discards that step.
    """
    cfg, engine = run.cfg, run.engine
    t, rank = cfg.train, E.rank()
    start = time.perf_counter()
    clear_memo = engine.zero_optimization_partition_weights() and run.release_memo_steps > 0
    run.release_memo_steps = max(0, run.release_memo_steps - 1)
    lr = engine.get_lr()[0]  # the LR this step's update uses (the scheduler advances inside engine.step)
    term_sums: dict[str, float] = {}
    nll_sums: dict[str, float] = {}
    num_tokens, chunks, nonfinite_loss = 0, {}, False
    for micro in range(t.grad_accum):
        if clear_memo:
            E.forget_zero3_release_decisions()
        indices = {name: run.samplers[name].indices(step, micro, rank) for name in run.streams}
        batches = {name: s.batch(indices[name], cfg.data.seq_len, run.pad_id) for name, s in run.streams.items()}
        for name, ids in indices.items():  # which chunks this step took, per stream (log.jsonl "chunks")
            chunks.setdefault(name, []).extend(ids)
        outputs = fused_forward(engine, run.method, batches, run.reference)
        terms = run.method.terms(outputs)
        total = sum(run.weights[k] * v for k, v in terms.items())
        with torch.no_grad():
            nlls = {n: chunk_nll(o.logits.detach(), o.labels).mean() for n, o in outputs.items()}
        # One small all-reduce: every rank must take the same decision.
        guarded = nlls.get("forget", torch.zeros(()))
        flags = torch.tensor([0.0 if torch.isfinite(total.detach()) else 1.0, float(guarded)], dtype=torch.float64)
        flags = E.all_reduce_sum(flags)
        forget_nll = flags[1].item() / E.world_size()
        # A non-finite loss is not stopped here: its gradient is non-finite, and DeepSpeed (ZeRO 1-3, any precision)
        # then discards the whole optimizer step and leaves weights and optimizer states as they were. The caller
        # counts skipped steps (guard.max_consecutive_skips).
        nonfinite_loss = nonfinite_loss or flags[0].item() > 0 or not math.isfinite(forget_nll)
        if cfg.guard.forget_loss_ceiling is not None and forget_nll > cfg.guard.forget_loss_ceiling:
            return {"stop": f"forget loss {forget_nll:.4f} above guard.forget_loss_ceiling="
                            f"{cfg.guard.forget_loss_ceiling} at step {step + 1}"}
        # The last reference to the logits ([B, T, V]): with it gone, the backward frees them before the optimizer
        # step instead of after it (benchmarks/RESULTS.md section 10: the step phase's peak).
        del outputs
        engine.backward(total)
        engine.step()
        for k, v in terms.items():
            term_sums[k] = term_sums.get(k, 0.0) + float(v.detach())
        term_sums["total"] = term_sums.get("total", 0.0) + float(total.detach())
        for k, v in nlls.items():
            nll_sums[k] = nll_sums.get(k, 0.0) + float(v)
        num_tokens += sum(int(b["attention_mask"].sum()) for b in batches.values())
    values = E.all_reduce_sum(torch.tensor([*term_sums.values(), *nll_sums.values(), num_tokens],
                                           dtype=torch.float64))
    micro_steps = E.world_size() * t.grad_accum
    record = {f"loss/{k}": values[i].item() / micro_steps for i, k in enumerate(term_sums)}
    record.update({f"nll/{k}": values[len(term_sums) + j].item() / micro_steps for j, k in enumerate(nll_sums)})
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    # DeepSpeed 0.19.8 discards a step whose gradient is non-finite (ZeRO-3: stage3.py step(); ZeRO-1/2:
    # stage_1_and_2.py; the fp16 loss scaler's overflows too) and reports the norm as inf: nothing was updated.
    applied = engine.was_step_applied()
    elapsed = time.perf_counter() - start
    record.update({"lr": lr, "grad_norm": grad_norm, "skipped": 0 if applied else 1,
                   "tokens_per_s": values[-1].item() / elapsed, "step_seconds": elapsed, "stop": None,
                   "chunks": chunks})
    nonfinite = nonfinite_loss or (grad_norm is not None and not math.isfinite(grad_norm))
    if applied and nonfinite and cfg.guard.stop_on_nonfinite:
        # Only an engine without an overflow check (no ZeRO, no loss scaler) applies a non-finite update: the
        # weights are corrupt and the caller falls back to the last checkpoint.
        record["stop"] = f"non-finite loss or gradient norm applied at step {step + 1}"
        record["weights_corrupt"] = True
    return record
