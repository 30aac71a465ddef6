"""The one unlearning loop.

Per micro-step: the chunks of every stream the method declares are concatenated into ONE batch, the engine runs ONE
forward, each stream gets its slice of the logits, the method returns named loss terms, the loop weighs and sums them
and calls ``engine.backward`` once and ``engine.step`` once. Under ZeRO-3 every forward is a full parameter
all-gather, and DeepSpeed 0.19 refuses a second forward before a backward when timers are on.

    deepspeed --num_gpus 8 --module dsunlearn unlearn --config run.json --zero ds_configs/zero3.json
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import engine as E
from . import reference as R
from .config import ConfigError, RunConfig, to_dict
from .data import (StreamSampler, collate, load_documents, tokenize_and_chunk, write_json_atomic,
                   write_text_atomic)
from .methods import build_method, select_trainable, term_weights
from .methods.base import StreamOutputs
from .methods.terms import chunk_nll, split_streams
from .zero import load_zero_json, resolve

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIVERGED = 0, 3


@dataclass
class Stream:
    """A tokenised set, ready for sampling."""
    name: str
    source: str
    chunks: object  # datasets.Dataset of chunks
    stats: object
    fields: dict = field(default_factory=dict)
    """Per-chunk fields computed once before training (e.g. "random_labels"): name -> (rows -> [len(rows), ...])."""

    def batch(self, indices: list[int], seq_len: int, pad_id: int) -> dict:
        out = collate(self.chunks[indices]["input_ids"], seq_len, pad_id)
        out["row"] = torch.as_tensor(indices, dtype=torch.long)  # lets a reference cache find these chunks
        out.update({name: read(indices) for name, read in self.fields.items()})
        return out


@dataclass
class RunState:
    step: int = 0
    stop_reason: Optional[str] = None
    tokens: int = 0         # real (non-pad) tokens trained on in this process
    seconds: float = 0.0    # wall time of those optimizer steps


def plan_cost(cfg: RunConfig, method, streams: dict, engine, world: int, state: RunState) -> dict:
    """Analytic FLOPs of this run (every pass the method makes) and the retraining comparison (dsunlearn.cost)."""
    from .cost import KNOWN_PRETRAINING, ModelShape, run_cost, run_passes
    t, seq = cfg.train, cfg.data.seq_len
    per_step = {n: t.micro_batch_size * (t.retain_ratio if n != "forget" else 1) * t.grad_accum * world * seq
                for n in streams}
    reference = tuple(getattr(method, "reference", {}) or {})
    one_time = 0
    if reference and cfg.reference.mode == "cache":
        one_time += sum(streams[n].stats.num_chunks * seq for n in reference)
    for n, kind in (getattr(method, "precomputed", {}) or {}).items():
        if kind != "random_labels":  # adversarial labels: one theta_0 forward over the stream
            one_time += streams[n].stats.num_chunks * seq
    pretrain_tokens = cfg.cost.pretrain_tokens
    if pretrain_tokens is None and cfg.cost.known_model:
        if cfg.cost.known_model not in KNOWN_PRETRAINING:
            raise ConfigError(f"cost.known_model: unknown {cfg.cost.known_model!r}; known: "
                              f"{', '.join(sorted(KNOWN_PRETRAINING))}")
        pretrain_tokens = KNOWN_PRETRAINING[cfg.cost.known_model][1]
    tokens_per_s = state.tokens / state.seconds if state.seconds else None
    return run_cost(ModelShape.from_model(engine.module), seq, run_passes(per_step, reference, cfg.reference.mode),
                    state.step, one_time, pretrain_tokens, tokens_per_s, state.tokens or None)


def prepare_run_dir(run_dir: str, overwrite: bool, resume: bool) -> None:
    """Refuse to mix two runs in one directory (rank 0 only)."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output.run_dir: {run_dir} exists and is not a directory")
    if resume:
        if not (path / "checkpoints" / "latest.json").is_file():
            raise ConfigError(f"--resume {run_dir}: no complete checkpoint there (checkpoints/latest.json missing)")
        return
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"output.run_dir: {run_dir} is not empty; pass --overwrite to replace it or "
                              f"--resume {run_dir} to continue it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def resolve_configs(cfg: RunConfig, zero_path: str, world_size: int) -> dict:
    return resolve(load_zero_json(zero_path), cfg, world_size, source=zero_path)


def load_stream(name: str, path: str, cfg: RunConfig, tokenizer) -> Stream:
    docs = load_documents(path, cfg.data.text_field)
    chunks, stats = tokenize_and_chunk(docs, tokenizer, cfg.data.seq_len, cfg.data.min_chunk_tokens,
                                       cfg.data.add_eos, cfg.data.num_proc, source=f"data.{name} ({path})")
    return Stream(name=name, source=path, chunks=chunks, stats=stats)


def stream_sources(cfg: RunConfig, streams: tuple) -> dict[str, str]:
    """Which file feeds each stream a method declares (the retain stream reads data.retain_source)."""
    out = {}
    for name in streams:
        key = cfg.data.retain_source if name == "retain" else name
        path = getattr(cfg.data, key, None)
        if not path:
            raise ConfigError(f"data.{key}: required by method {cfg.method.name!r} (stream {name!r})")
        out[name] = path
    return out


def plan_steps(cfg: RunConfig, num_chunks: int, world_size: int) -> int:
    """train.num_steps, or enough steps for train.epochs over the method's first stream (the forget set)."""
    if cfg.train.num_steps is not None:
        return cfg.train.num_steps
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    return max(1, math.ceil(cfg.train.epochs * num_chunks / global_batch))


class RunLogger:
    """log.jsonl + TensorBoard scalars + tqdm, on rank 0 only."""

    def __init__(self, run_dir: str, num_steps: int, start_step: int, enabled: bool, desc: str = "unlearn"):
        self.enabled = enabled
        self.writer = self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        self.path = Path(run_dir) / "log.jsonl"
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=num_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, record["step"])
        self.bar.update(1)
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in record.items() if k.startswith("loss/")})

    def scalars(self, step: int, values: dict) -> None:
        if self.enabled:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.flush()
            self.writer.close()
            self.bar.close()


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


def save_checkpoint(engine, run_dir: str, step: int, keep_last: int) -> None:
    """DeepSpeed checkpoint + our own ``latest.json``, written only after every rank finished writing.

    DeepSpeed's own ``latest`` file is not used: ours is replaced atomically after a barrier, so a crash during a
    save leaves the previous complete checkpoint as the one a resume loads.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    E.barrier()
    if E.is_main():
        write_json_atomic(ckpt_dir / "latest.json", {"tag": tag, "step": step, "world_size": E.world_size()})
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    E.barrier()


def load_latest_checkpoint(engine, run_dir: str) -> int:
    ckpt_dir = Path(run_dir) / "checkpoints"
    latest = json.loads((ckpt_dir / "latest.json").read_text())
    if latest["world_size"] != E.world_size():
        raise ConfigError(
            f"--resume {run_dir}: checkpoint {latest['tag']} was written by {latest['world_size']} ranks, this run has "
            f"{E.world_size()}. ZeRO checkpoints are tied to the world size: resume with {latest['world_size']} ranks, "
            f"or consolidate with `python {ckpt_dir}/zero_to_fp32.py {ckpt_dir} OUT --tag {latest['tag']} "
            f"--safe_serialization` and start a new run from OUT")
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=latest["tag"])
    return int(client["step"])


def cost_line(cost: dict) -> str:
    line = f"unlearning {cost['unlearning_flops']:.3g} FLOPs ({cost['steps']} steps)"
    if "retrain" in cost:
        r = cost["retrain"]
        line += f"; retraining {r['retrain_flops']:.3g} FLOPs; ratio {r['ratio']:.3g}x"
    return line


def truncate_log(path: Path, step: int) -> None:
    """On resume: drop log lines of steps after the checkpoint (they are run again)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(line + "\n" for line in keep))


def restore_last_good(engine, run_dir: str, state: RunState) -> bool:
    """After an update with a non-finite gradient: reload the last checkpoint. False when there is none."""
    if not (Path(run_dir) / "checkpoints" / "latest.json").is_file():
        state.stop_reason += "; no checkpoint to fall back to, so no model is exported"
        return False
    state.step = load_latest_checkpoint(engine, run_dir)
    state.stop_reason += f"; weights restored from the checkpoint of step {state.step}"
    return True


def unlearn(cfg: RunConfig, zero_path: str, overwrite: bool = False, resume: bool = False,
            reference_factory=None, method=None) -> int:
    """Run one unlearning job end to end. Returns the process exit code.

    ``method`` overrides the registry lookup (``dsunlearn pretrain`` passes plain language modelling).
    """
    started = time.time()
    E.init_distributed()
    world = E.world_size()
    ds_config = resolve_configs(cfg, zero_path, world)
    run_dir = cfg.output.run_dir
    method = method or build_method(cfg.method)
    weights = term_weights(method, cfg.method)

    # Everything a user can get wrong is checked before the run directory is touched.
    E.check_model_dir(cfg)
    tokenizer = E.load_tokenizer(cfg)
    model_config = E.load_model_config(cfg)
    E.check_model_tokenizer(model_config, tokenizer, cfg.data.seq_len)
    with E.main_process_first():
        streams = {name: load_stream(name, path, cfg, tokenizer)
                   for name, path in stream_sources(cfg, method.streams).items()}
    # Rank 0 checks the run dir; every rank learns the verdict, so a refusal exits everywhere with code 2.
    error = None
    if E.is_main():
        try:
            prepare_run_dir(run_dir, overwrite, resume)
        except ConfigError as e:
            error = str(e)
    error = E.broadcast_object(error)
    if error:
        raise ConfigError(error)
    num_steps = plan_steps(cfg, streams[method.streams[0]].stats.num_chunks, world)
    if E.is_main():
        write_json_atomic(Path(run_dir) / "config.json", to_dict(cfg))
        write_json_atomic(Path(run_dir) / "ds_config.json", ds_config)
        if not resume:  # the ZeRO JSON as the user wrote it: --resume re-resolves it for its own world size
            write_json_atomic(Path(run_dir) / "ds_config.user.json", load_zero_json(zero_path))
        write_json_atomic(Path(run_dir) / "data_stats.json",
                          {n: {"source": s.source, **s.stats.__dict__} for n, s in streams.items()})
    model, _hf_ds_handle = E.load_model(cfg, ds_config)
    select_trainable(model, method)  # RMU trains a few matrices: frozen before DeepSpeed sees the parameters
    engine = E.build_train_engine(model, ds_config, cfg, num_steps)
    # Until its first step (or a resume's checkpoint load) the engine holds theta_0: precomputed labels and reference
    # caches are computed from it, so reference.mode="cache" never has a second model in memory.
    R.attach_precomputed(cfg, method, engine, streams, tokenizer)
    reference = (reference_factory or R.build_reference)(cfg, ds_config, method, engine, streams, tokenizer)

    t = cfg.train
    samplers = {name: StreamSampler(num_chunks=s.stats.num_chunks,
                                    per_rank=t.micro_batch_size * (t.retain_ratio if name != "forget" else 1),
                                    grad_accum=t.grad_accum, world_size=world, seed=t.seed + 1009 * i)
                for i, (name, s) in enumerate(streams.items())}
    state = RunState()
    if resume:
        state.step = load_latest_checkpoint(engine, run_dir)
        if E.is_main():
            truncate_log(Path(run_dir) / "log.jsonl", state.step)
    logger = RunLogger(run_dir, num_steps, state.step, E.is_main(),
                       desc="pretrain" if method.streams == ("train",) else "unlearn")
    evaluator = None
    if method.streams != ("train",) and any(getattr(cfg.data, n, None) for n in cfg.eval.splits):
        from .eval.runner import Evaluator
        evaluator = Evaluator(cfg, engine, tokenizer, logger, ds_config, run_dir, resume_step=state.step if resume else None)
    if evaluator is not None and not resume:
        evaluator.evaluate(0, label="before")
    pad_id = tokenizer.pad_token_id
    engine.train()
    exit_code = EXIT_OK
    weights_ok = True
    try:
        while state.step < num_steps:
            record = train_step(engine, method, weights, streams, samplers, state.step, cfg, pad_id, reference)
            if record["stop"]:
                state.stop_reason = record["stop"]
                exit_code = EXIT_DIVERGED
                if E.is_main():
                    log.error("stopping at step %d: %s", state.step + 1, state.stop_reason)
                if record.get("weights_corrupt"):
                    weights_ok = restore_last_good(engine, run_dir, state)
                break
            state.step += 1
            state.tokens += int(round(record["tokens_per_s"] * record["step_seconds"]))
            state.seconds += record["step_seconds"]
            record = {"step": state.step, **{k: v for k, v in record.items() if k != "stop"}}
            logger.step(record)
            if cfg.checkpoint.every_n_steps and state.step % cfg.checkpoint.every_n_steps == 0 \
                    and state.step < num_steps:
                save_checkpoint(engine, run_dir, state.step, cfg.checkpoint.keep_last)
            if evaluator is not None and cfg.eval.every_n_steps and state.step % cfg.eval.every_n_steps == 0:
                if evaluator.evaluate(state.step, label=f"step {state.step}") == "stop":
                    state.stop_reason = "stop rule: the forget set looks unseen"
                    break
        if exit_code == EXIT_OK:
            save_checkpoint(engine, run_dir, state.step, cfg.checkpoint.keep_last)
        # With the stop rule on, the evaluator has already exported the weights that best met it.
        if cfg.output.save_model and weights_ok and not (evaluator is not None and evaluator.tracks_best):
            E.export_hf_model(engine, tokenizer, str(Path(run_dir) / "model"))
        cost = plan_cost(cfg, method, streams, engine, world, state)
        logger.scalars(state.step, {"cost/unlearning_flops": float(cost["unlearning_flops"]),
                                    "cost/flops_per_step": float(cost["flops_per_step"]["total"])})
        if evaluator is not None:
            evaluator.finish(state, extra={"cost": cost})
        if E.is_main():
            write_json_atomic(Path(run_dir) / "summary.json",
                              {"steps": state.step, "num_steps": num_steps, "stop_reason": state.stop_reason,
                               "exit_code": exit_code, "train_seconds": round(state.seconds, 3),
                               "wall_seconds": round(time.time() - started, 3), "cost": cost})
            log.info("cost: %s", cost_line(cost))
    finally:
        logger.close()
    return exit_code


def train_step(engine, method, weights, streams, samplers, step, cfg, pad_id, reference) -> dict:
    """One optimizer step (grad_accum micro-steps). Returns rank-averaged scalars and a stop reason (or None).

    The divergence guard runs before each backward: a non-finite loss or a forget NLL above the ceiling stops the
    run *before* the update, so the engine still holds the last good weights.
    """
    t, rank = cfg.train, E.rank()
    start = time.perf_counter()
    if engine.zero_optimization_partition_weights():
        E.forget_zero3_release_decisions()
    lr = engine.get_lr()[0]  # the LR this step's update uses (the scheduler advances inside engine.step)
    term_sums: dict[str, float] = {}
    nll_sums: dict[str, float] = {}
    num_tokens = 0
    for micro in range(t.grad_accum):
        batches = {name: s.batch(samplers[name].indices(step, micro, rank), cfg.data.seq_len, pad_id)
                   for name, s in streams.items()}
        outputs = fused_forward(engine, method, batches, reference)
        terms = method.terms(outputs)
        total = sum(weights[k] * v for k, v in terms.items())
        with torch.no_grad():
            nlls = {n: chunk_nll(o.logits.detach(), o.labels).mean() for n, o in outputs.items()}
        # One small all-reduce: every rank must take the same decision.
        guarded = nlls.get("forget", torch.zeros(()))
        flags = torch.tensor([0.0 if torch.isfinite(total.detach()) else 1.0, float(guarded)], dtype=torch.float64)
        flags = E.all_reduce_sum(flags)
        forget_nll = flags[1].item() / E.world_size()
        if cfg.guard.stop_on_nonfinite and (flags[0].item() > 0 or not math.isfinite(forget_nll)):
            return {"stop": f"non-finite loss at step {step + 1}"}
        if cfg.guard.forget_loss_ceiling is not None and forget_nll > cfg.guard.forget_loss_ceiling:
            return {"stop": f"forget loss {forget_nll:.4f} above guard.forget_loss_ceiling="
                            f"{cfg.guard.forget_loss_ceiling} at step {step + 1}"}
        engine.backward(total)
        engine.step()
        for k, v in terms.items():
            term_sums[k] = term_sums.get(k, 0.0) + float(v.detach())
        term_sums["total"] = term_sums.get("total", 0.0) + float(total.detach())
        for k, v in nlls.items():
            nll_sums[k] = nll_sums.get(k, 0.0) + float(v)
        num_tokens += sum(int(b["attention_mask"].sum()) for b in batches.values())
    keys = list(term_sums) + list(nll_sums)
    values = torch.tensor([term_sums[k] for k in term_sums] + [nll_sums[k] for k in nll_sums] + [num_tokens],
                          dtype=torch.float64)
    values = E.all_reduce_sum(values)
    world = E.world_size()
    record = {}
    for i, k in enumerate(term_sums):
        record[f"loss/{k}"] = values[i].item() / (world * t.grad_accum)
    for j, k in enumerate(nll_sums):
        record[f"nll/{k}"] = values[len(term_sums) + j].item() / (world * t.grad_accum)
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    elapsed = time.perf_counter() - start
    record.update({"lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": values[-1].item() / elapsed, "step_seconds": elapsed,
                   "stop": None})
    if cfg.guard.stop_on_nonfinite and grad_norm is not None and not math.isfinite(grad_norm):
        # The update already happened: the caller must fall back to the last checkpoint.
        record["stop"] = f"non-finite gradient norm at step {step + 1}"
        record["weights_corrupt"] = True
    return record
