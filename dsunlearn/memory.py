"""Will it fit? A per-device memory plan before launch: ``dsunlearn unlearn --dry-run [--device-memory 80GB]``.

A run peaks in one of its phases, each planned on its own; the plan's peak is the largest:

- ``engine``: building the trained engine. Weights, gradient partitions and the fp32 master copy exist (Adam's
  moments appear at the first step), plus one transient copy of the weight partition (DeepSpeed defragments the
  partitions into one flat buffer).
- ``reference``: building theta_0. Mode "engine": its frozen weight partition, filled one gathered layer at a time.
  Mode "cache" (and precomputed labels): a no-grad pass of the trained engine at the method's batch size. Mode
  "adapters_off": nothing.
- ``forward/backward``: every model state, theta_0's weights when it is an engine, ZeRO-3's gathered weights, and the
  micro-step's transient memory: activations, logits, the loss terms' temporaries and their gradients, parameter
  gradients until they are reduced (theta_0's no-grad forward included when it runs each micro-step).
- ``optimizer step``: every model state, theta_0's weights, and the step's temporaries.
- ``evaluation`` (when ``eval.splits`` has any): a no-grad forward at ``eval.micro_batch_size`` and every per-chunk
  statistic, with the run's engines in memory, and the retrained twin's (``eval.retrained_model``) while it is scored.
- ``relearn audit`` (``eval.audits``): the audit's full fine-tune of the exported model (every weight, also after a
  LoRA run) on ``audit.relearn_batch_size`` chunks, after the run's engines are released.
- ``relearn audit evaluation``: the audit scores its splits after every fine-tune step, on the same train engine (its
  optimizer states allocated): the evaluation phase's no-grad forward at ``eval.micro_batch_size``, beside the
  audit's model states.

Where the numbers come from:

- Model states: DeepSpeed's own estimators (``estimate_zero3_model_states_mem_needs``,
  ``estimate_zero2_model_states_mem_needs``) for the trained parameters, with the ZeRO JSON's offload flags. They
  assume 16-bit weights: per parameter 2 bytes of weights + 16 bytes of gradients, fp32 master weights and Adam's
  moments. With an fp32 ZeRO JSON DeepSpeed still keeps a separate fp32 master partition (measured:
  ``benchmarks/bench_memory_plan.py``), so the weights cost 2 bytes more: 20 bytes per parameter. Frozen parameters
  (LoRA's base, RMU's untouched layers) only hold their weight partition. Plus ZeRO's reduce bucket.
- Gathered weights (ZeRO-3, more than one rank): DeepSpeed keeps fetched parameters until
  ``stage3_max_live_parameters`` are live and prefetches ``stage3_prefetch_bucket_size`` more. With the simulated
  gradients this replaces the estimators' largest-layer term.
- Transient memory: one real micro-step of this run (the loop's fused forward, the method's terms, the backward) on
  fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no storage) under PyTorch's ``MemTracker``,
  which follows every tensor's life. Parameter gradients are dropped as soon as they are accumulated, as ZeRO's reduce
  hooks do. The fake tensors run the CPU kernels' choices (attention: PyTorch's fused SDPA on CPU, which keeps the same
  tensors for the backward as the CUDA flash kernel). Deep models are run at two depths and extrapolated.
- The optimizer step: AdamW's temporaries on one flat partition (ZeRO-3: one ``sub_group_size``), measured the same
  way, plus DeepSpeed's fp32 copy of the flat gradients in fp32 runs.

What the plan leaves out: the CUDA context and NCCL buffers (hundreds of MiB on a GPU, not tensors), allocator
fragmentation (``--device-memory`` keeps ``HEADROOM`` of the device free for them), and host memory (the state dict
``from_pretrained`` reads while partitions fill). Measured against real CPU runs in ``benchmarks/RESULTS.md``
section 10.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import torch

from .config import ConfigError
from .cost import text_config
from .zero import precision, zero_stage

HEADROOM = 0.10
"""Share of the device the plan keeps free for what it does not count (CUDA context, NCCL, fragmentation)."""

GIB = 2**30
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": GIB, "GB": GIB, "GIB": GIB, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_memory(text: str, source: str = "--device-memory") -> int:
    """``"80GB"``, ``"80GiB"``, ``"141G"``, ``"24000MiB"`` or a number of bytes. GB and GiB both mean 2**30 bytes: a
    GPU sold as "80GB" has 80 GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"{source} {text!r}: expected a size such as 80GB, 80GiB or 24000MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------------------
# Model states (DeepSpeed's estimators)

@dataclass(frozen=True)
class ModelCounts:
    total: int
    """Every parameter (tied matrices once), LoRA adapters included."""
    trainable: int
    largest_layer: int
    """Parameters of the module with the most direct parameters (DeepSpeed's ``largest_layer_params``)."""


def count_parameters(model: torch.nn.Module) -> ModelCounts:
    """Counts of a (meta) model as it will be trained (adapters applied, frozen parameters marked)."""
    seen, trainable = {}, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen[id(p)] = p.numel()
            trainable += p.numel() if p.requires_grad else 0
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ModelCounts(total=sum(seen.values()), trainable=trainable, largest_layer=largest)


def _offload(zero: dict, key: str) -> bool:
    return str(zero.get(key, {}).get("device", "none")).lower() in ("cpu", "nvme")


def model_states(counts: ModelCounts, ds_config: dict, world_size: int) -> dict[str, int]:
    """Per-device bytes of the trained engine's model states, by DeepSpeed's estimators (see the module docstring):
    ``weights``, ``gradients``, ``optimizer`` (master weights and Adam's moments), ``gathered_layer`` (DeepSpeed's
    largest-layer term), ``buckets``, and ``total``."""
    stage, dtype = zero_stage(ds_config), precision(ds_config)
    zero = ds_config.get("zero_optimization", {})
    offload_optimizer, offload_params = _offload(zero, "offload_optimizer"), _offload(zero, "offload_param")
    nt, frozen = counts.trainable, counts.total - counts.trainable
    fp32 = dtype == "fp32"
    width = 4 if fp32 else 2
    grad_width = 4 if fp32 or ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32" else 2
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        _, total, layer = estimate_zero3_model_states_mem_needs(
            nt, counts.largest_layer, num_gpus_per_node=world_size, num_nodes=1, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=True)
        shards = world_size
        trained_on_device = 0 if offload_params else nt // shards
        frozen_on_device = 0 if offload_params else frozen // shards
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        shards = world_size if stage > 0 else 1
        offload_optimizer = offload_optimizer and stage > 0
        _, total = estimate_zero2_model_states_mem_needs(nt, num_gpus_per_node=shards, num_nodes=1,
                                                         cpu_offload=offload_optimizer)
        layer, trained_on_device, frozen_on_device = 0, nt, frozen
    if fp32:
        # The estimators count 2-byte weights; the rest of their 18 bytes per parameter already holds 4-byte gradients
        # (their breakdown: 16-bit gradients plus an fp32 copy), the fp32 master weights (DeepSpeed keeps a separate
        # partition even when the weights are fp32) and Adam's moments. In fp32 the weights on the device and the
        # gathered largest layer cost twice as much.
        total += 2 * trained_on_device + layer
        layer *= 2
    weights = width * (trained_on_device + frozen_on_device)
    total += width * frozen_on_device
    gradients = 0 if offload_optimizer else grad_width * nt // shards
    buckets = grad_width * int(zero.get("reduce_bucket_size", 5e8)) if stage > 0 and not offload_optimizer else 0
    optimizer = max(0, total - layer - weights - gradients)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "gathered_layer": layer,
            "buckets": buckets, "total": total + buckets}


def gathered_parameters(counts: ModelCounts, ds_config: dict, world_size: int) -> int:
    """Per-device bytes of gathered ZeRO-3 weights during the forward and backward. DeepSpeed keeps fetched parameters
    until ``stage3_max_live_parameters`` are live and prefetches ``stage3_prefetch_bucket_size`` more, and never less
    than the largest layer. On one rank nothing is gathered: a parameter's partition is the whole parameter, used in
    place. (Their gradients are in the simulated micro-step, which sees every gradient until it is reduced.)"""
    zero = ds_config.get("zero_optimization", {})
    if zero_stage(ds_config) != 3 or world_size == 1:
        return 0
    width = 4 if precision(ds_config) == "fp32" else 2
    live = int(zero.get("stage3_max_live_parameters", 1e9)) + int(zero.get("stage3_prefetch_bucket_size", 5e7))
    return width * max(counts.largest_layer, min(counts.total, live))


# ---------------------------------------------------------------------------------------------------------------------
# Transient memory: one micro-step on fake tensors

def _fake_batches(method, cfg) -> dict[str, dict]:
    """Full-length chunks for every stream (the worst case), with the method's precomputed label fields."""
    t, seq = cfg.train, cfg.data.seq_len
    out = {}
    for name in method.streams:
        b = method.stream_batch_size(name, t)
        batch = {"input_ids": torch.zeros(b, seq, dtype=torch.long), "attention_mask": torch.ones(b, seq, dtype=torch.long),
                 "labels": torch.zeros(b, seq, dtype=torch.long), "row": torch.arange(b)}
        for kind in ([method.precomputed[name]] if name in method.precomputed else []):
            batch[kind] = torch.zeros(b, seq, dtype=torch.long)
        out[name] = batch
    return out


def _tracker():
    """PyTorch's MemTracker without its gradient hooks: it would hook every parameter, and a hook on a frozen one
    (LoRA's base, RMU's other layers) is an error. Gradients are still counted: every allocation is."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)
    return Tracker()


def _peak_transient(run) -> int:
    """Peak bytes of what ``run()`` allocates beyond parameters and buffers, under MemTracker."""
    tracker = _tracker()
    with tracker:
        run(tracker)
    peak = tracker.get_tracker_snapshot("peak")
    by_kind = next(iter(peak.values())) if peak else {}
    parameters = sum(v for k, v in by_kind.items() if str(getattr(k, "value", k)) in ("Parameter", "Buffer"))
    return int(by_kind.get("Total", 0) - parameters)


EXTRAPOLATE_FROM = (2, 4)
"""Decoder depths simulated for a deeper model: every layer keeps the same tensors, so the transient is linear in the
depth (with checkpointing too: one boundary tensor per layer plus one layer's recompute). Two and four layers, not one
and two, so that models alternating two kinds of layer (sliding-window and global attention) are sampled evenly."""


def _num_layers(config) -> Optional[int]:
    return getattr(config, "num_hidden_layers", None)


def with_layers(config, num_layers: int):
    """A copy of a Hugging Face config with ``num_layers`` decoder layers (per-layer lists cut to match)."""
    import copy
    config = copy.deepcopy(config)
    config.num_hidden_layers = num_layers
    for name in ("layer_types", "block_types"):
        if isinstance(getattr(config, name, None), list):
            setattr(config, name, getattr(config, name)[:num_layers])
    return config


def simulate(p, activation_checkpointing: bool, reference_mode: str, no_grad_passes: bool = True) -> dict[str, int]:
    """Transient bytes of ``p``'s run (a ``prepare.Prepared``): ``step`` (one micro-step, theta_0's forward included
    when it runs every micro-step) and ``theta0_pass`` (one batch of the cache or precomputed-label pass).

    A model deeper than ``EXTRAPOLATE_FROM[1]`` layers is simulated at those two depths and extrapolated linearly
    (exact for identical layers; ``tests/unit/test_memory_plan.py``), unless the method picks layers by index
    (RMU's hidden state and trained matrices), which needs the whole model. ``no_grad_passes=False`` leaves out
    ``theta0_pass`` and ``eval_pass`` (0): checkpointing does not change them, so the second variant reuses them."""
    depth = _num_layers(p.model_config)
    lo, hi = EXTRAPOLATE_FROM
    if depth is None or depth <= hi or p.method.needs_hidden_states or p.method.trainable_params:
        return simulate_depth(p, p.model_config, activation_checkpointing, reference_mode, no_grad_passes)
    at = {n: simulate_depth(p, with_layers(p.model_config, n), activation_checkpointing, reference_mode,
                            no_grad_passes) for n in (lo, hi)}
    return {k: at[lo][k] + (depth - lo) * (at[hi][k] - at[lo][k]) // (hi - lo) for k in at[lo]}


def simulate_depth(p, model_config, activation_checkpointing: bool, reference_mode: str,
                   no_grad_passes: bool = True) -> dict[str, int]:
    """``simulate`` for one model config, every layer run."""
    import warnings
    from torch._subclasses.fake_tensor import FakeTensorMode
    from . import engine as E
    from .reference import AdaptersOffReference, EngineReference, _check_needs

    cfg, method = p.cfg, p.method
    model = planned_model(p, model_config, E.torch_dtype(p.ds_config))
    needs, hidden_index = _check_needs(method)
    result = {"step": 0, "theta0_pass": 0, "eval_pass": 0}
    with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter("ignore")
        model = model.to_empty(device="cpu")
        model.config.use_cache = False
        if activation_checkpointing:
            E.enable_activation_checkpointing(model)
        for q in model.parameters():
            if q.requires_grad:  # ZeRO reduces each gradient into its partition as soon as it is complete
                q.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
        batches = _fake_batches(method, cfg)
        passes = {**needs, **method.precomputed} if no_grad_passes else {}
        if passes:
            model.eval()
            reference = EngineReference(model, {n: "logits" if k not in ("seq_logprob", "hidden") else k
                                                 for n, k in passes.items()}, hidden_index)
            result["theta0_pass"] = _peak_transient(lambda _: reference.outputs_for(batches, torch.device("cpu")))
        if cfg.eval.splits and no_grad_passes:
            model.eval()
            result["eval_pass"] = _peak_transient(lambda _: eval_pass(model, cfg.eval.micro_batch_size,
                                                                      cfg.data.seq_len))
        model.train()
        if needs and reference_mode == "cache":
            with torch.no_grad():
                cached = EngineReference(model, needs, hidden_index).outputs_for(batches, torch.device("cpu"))
            reference = _Fixed(cached)
        elif needs:
            reference = (AdaptersOffReference if reference_mode == "adapters_off" else EngineReference)(
                model, needs, hidden_index)
        else:
            reference = None

        if method.streams:  # a phased method's evaluation-only last phase (phased.HOLD) takes no step
            result["step"] = _peak_transient(lambda tracker: micro_step(model, method, p.weights, batches,
                                                                        reference, tracker))
    return result


def eval_pass(model, batch_size: int, seq_len: int) -> None:
    """One batch of evaluation as ``eval/runner.score_split`` runs it: a no-grad forward and every per-chunk
    statistic (losses, accuracy, the membership scores) from its logits."""
    from . import engine as E
    from .eval.metrics import chunk_stats
    batch = {"input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
    with torch.no_grad():
        logits = E.forward(model, batch).logits
        chunk_stats(logits, torch.zeros(batch_size, seq_len, dtype=torch.long))


def micro_step(model, method, weights: dict, batches: dict, reference, tracker) -> None:
    """One training micro-step as the loop runs it (``loop.fused_forward``, the method's terms, the backward) on
    ``model``, inside ``tracker`` (a MemTracker)."""
    from .loop import fused_forward
    # theta_0's forward and the trained forward call the same modules: MemTracker's per-module statistics (not its
    # peak) must start again in between.
    outputs = fused_forward(model, method, batches, _Then(reference, tracker.reset_mod_stats))
    terms = method.terms(outputs)
    sum(weights.get(k, 1.0) * v for k, v in terms.items()).backward()


class _Then:
    """A reference that calls ``then()`` after handing out theta_0's outputs."""

    def __init__(self, reference, then):
        self.reference, self.then = reference, then

    def outputs_for(self, streams, device):
        if self.reference is None:
            return {}
        try:
            return self.reference.outputs_for(streams, device)
        finally:
            self.then()


class _Fixed:
    """theta_0's outputs, computed once (what a cache hands the loop)."""

    def __init__(self, outputs):
        self.outputs = outputs

    def outputs_for(self, streams, device):
        return self.outputs


# ---------------------------------------------------------------------------------------------------------------------
# The plan

def planned_model(p, model_config=None, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The model as the run trains it, on the meta device: LoRA adapters applied, or the method's frozen parameters
    marked. ``model_config``: another depth of ``p.model_config``; ``dtype``: the weights' dtype, set before the
    adapters are added (as loading does), so peft keeps its own dtype for them."""
    from .adapter import apply_adapter
    from .cost import meta_model
    from .methods import select_trainable
    model = meta_model(model_config or p.model_config)
    if dtype is not None:
        model = model.to(dtype)
    if p.cfg.adapter.rank > 0:
        return apply_adapter(model, p.cfg.adapter, p.method.trainable_params, seed=p.cfg.train.seed)
    select_trainable(model, p.method)
    return model


def optimizer_step_bytes(counts: ModelCounts, ds_config: dict, world_size: int, train) -> int:
    """Per-device transient bytes of DeepSpeed's optimizer step, which works on one flat partition at a time (ZeRO-3:
    at most ``sub_group_size`` elements): an fp32 copy of the flattened gradients (in the estimators' 18 bytes for
    16-bit runs, extra in fp32) plus what ``torch.optim.AdamW.step`` allocates beside its moments, measured on fake
    tensors (CPU's single-tensor path: the square-root and the denominator; CUDA's foreach path allocates one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    stage = zero_stage(ds_config)
    zero = ds_config.get("zero_optimization", {})
    if stage > 0 and _offload(zero, "offload_optimizer"):
        return 0  # the step runs on the host
    shards = world_size if stage > 0 else 1
    n = -(-counts.trainable // shards)
    if stage == 3:
        n = min(n, int(zero.get("sub_group_size", 1e9)))
    if n == 0:
        return 0
    def two_steps(_):
        # Everything inside the tracker: a tensor made before it and changed in place inside would count as new.
        flat = torch.nn.Parameter(torch.empty(n))
        flat.grad = torch.empty(n)
        optimizer = torch.optim.AdamW([flat], lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                                      weight_decay=train.weight_decay)
        optimizer.step()  # creates the moments
        optimizer.step()
    with FakeTensorMode():
        # Less the four parameter-sized tensors that are not temporaries: weights, gradient, Adam's two moments.
        adam = _peak_transient(two_steps) - 4 * 4 * n
    return adam + (4 * n if precision(ds_config) == "fp32" else 0)


def _phases(counts: ModelCounts, adapter_params: int, ds_config: dict, world_size: int, mode: str, needs_theta0: bool,
            transient: dict[str, int]) -> tuple[dict, dict]:
    """(terms, phases) in bytes per device for one configuration."""
    stage, width = zero_stage(ds_config), 4 if precision(ds_config) == "fp32" else 2
    states = model_states(counts, ds_config, world_size)
    offload_optimizer = _offload(ds_config.get("zero_optimization", {}), "offload_optimizer") and stage > 0
    moments = 0 if offload_optimizer else 8 * counts.trainable // (world_size if stage > 0 else 1)
    # A frozen copy of the model (θ0 as an engine, the twin): its weight partition, no adapters.
    frozen_copy = width * (counts.total - adapter_params) // (world_size if stage == 3 else 1)
    theta0 = frozen_copy if needs_theta0 and mode == "engine" else 0
    # DeepSpeed's largest-layer term (weights and gradient) is replaced by the gathered weights and the simulated
    # step's gradients.
    gathered = gathered_parameters(counts, ds_config, world_size)
    terms = {"weights": states["weights"], "gradients": states["gradients"], "optimizer states": states["optimizer"],
             "ZeRO buckets": states["buckets"], "theta_0 weights": theta0,
             "gathered weights (ZeRO-3)": gathered, "activations, logits, loss terms": transient["step"],
             "optimizer step temporaries": transient["optimizer_step"]}
    # keep_off.KeepOff: two fp32 copies of this device's share of the trainable weights
    kept_off = 8 * counts.trainable // (world_size if stage == 3 else 1) if transient.get("kept_off") else 0
    if kept_off:
        terms["kept-off direction and origin (keep_off)"] = kept_off
    resident = states["total"] - states["gathered_layer"] + theta0 + kept_off  # between steps: nothing gathered
    built = resident - theta0 - moments - kept_off  # Adam's moments appear at the first step; keep_off after it
    load = theta0 + width * counts.largest_layer if theta0 else 0  # partitions filled one gathered layer at a time
    passes = max(transient["theta0_pass"] if mode == "cache" else 0, transient.get("labels_pass", 0))
    passes += gathered if passes else 0  # a no-grad pass of the trained engine gathers its weights too
    phases = {
        "engine": built + states["weights"],  # + one copy of the weight partition while DeepSpeed defragments it
        "reference": built + max(load, passes),
        "forward/backward": resident + gathered + transient["step"],
        "optimizer step": resident + transient["optimizer_step"],
    }
    if transient.get("eval_pass"):  # evaluations run the trained engine without gradients, θ0 still in memory
        # The retrained twin is scored first, as a frozen engine of its own beside the run's.
        twin = frozen_copy if transient.get("twin") else 0
        phases["evaluation"] = resident + gathered + transient["eval_pass"] + twin
    return terms, phases


def relearn_audit_prepared(p):
    """The relearning audit's fine-tune (``eval/audit.py``) as a run of its own: every weight trains (an adapter run
    is audited on its merged model), plain language modelling on ``audit.relearn_batch_size`` chunks per step, and
    the held-out forget and the approximate split scored after every step (at ``eval.micro_batch_size``)."""
    from .eval.audit import relearn_config
    from .eval.verdict import MEMBER_SPLIT, NONMEMBER_SPLIT
    from .pretrain import LanguageModeling
    cfg = relearn_config(p.cfg, p.world_size)
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, rank=0),
                              train=dataclasses.replace(cfg.train, retain_ratio=1),
                              eval=dataclasses.replace(cfg.eval, splits=(MEMBER_SPLIT, NONMEMBER_SPLIT)))
    return dataclasses.replace(p, cfg=cfg, method=LanguageModeling(), weights={"train": 1.0})


AUDIT_PHASES = ("relearn audit", "relearn audit evaluation")


@dataclass(frozen=True)
class AuditPlan:
    """The relearning audit, planned as a run of its own (``relearn_audit_prepared``), after the run's engines are
    released."""
    prepared: object
    counts: ModelCounts
    transient: dict

    def phases(self, **transient) -> dict[str, int]:
        """The audit's phases, with ``transient`` changed: ``relearn audit`` (the fine-tune's forward/backward and
        optimizer step) and ``relearn audit evaluation`` (the scoring after every step: the evaluation phase of the
        audit's train engine, Adam's moments allocated)."""
        q = self.prepared
        _, phases = _phases(self.counts, 0, q.ds_config, q.world_size, "none", False, self.transient | transient)
        out = {"relearn audit": max(phases["forward/backward"], phases["optimizer step"])}
        if "evaluation" in phases:
            out["relearn audit evaluation"] = phases["evaluation"]
        return out


def relearn_audit_plan(p, activation_checkpointing: bool, eval_pass: Optional[int] = None) -> AuditPlan:
    """The relearning audit of ``p``'s run (its engine follows ``train.activation_checkpointing``). ``eval_pass``:
    the audit's evaluation pass when already simulated (checkpointing does not change it)."""
    q = relearn_audit_prepared(p)
    counts = count_parameters(planned_model(q))
    if eval_pass is None:
        transient = simulate(q, activation_checkpointing, "none")
    else:
        transient = simulate(q, activation_checkpointing, "none", no_grad_passes=False) | {"eval_pass": eval_pass}
    transient["optimizer_step"] = optimizer_step_bytes(counts, q.ds_config, q.world_size, q.cfg.train)
    return AuditPlan(q, counts, transient)


def plan_memory(p, device_memory: Optional[int] = None, kept_off: bool = False) -> dict:
    """The memory plan of a prepared run (``prepare.prepare``) on ``p.world_size`` devices: terms and phase peaks in
    bytes per device, with and without activation checkpointing; with ``device_memory``, whether it fits and the first
    knob to turn when it does not. ``kept_off``: the run's training is kept off a direction (``TrainPhase.keep_off``),
    which holds two fp32 copies of each device's share of the trainable weights."""
    cfg, method = p.cfg, p.method
    model = planned_model(p)
    counts = count_parameters(model)
    adapter_params = sum(q.numel() for n, q in model.named_parameters() if "lora_" in n)
    needs = bool(method.reference)
    mode = cfg.reference.mode if needs else "none"
    chosen = cfg.train.activation_checkpointing
    variants = {}
    step = optimizer_step_bytes(counts, p.ds_config, p.world_size, cfg.train)
    incomplete = None
    audit_eval_pass = None  # the audit's evaluation pass: the same in both variants
    for checkpointing in (False, True):
        audit = None
        if "relearn" in p.audits:
            try:
                audit = relearn_audit_plan(p, checkpointing, audit_eval_pass)
                audit_eval_pass = audit.transient["eval_pass"]
            except Exception as e:  # see below
                incomplete = (f"the relearning audit could not be run on fake tensors ({type(e).__name__}: "
                              f"{str(e)[:200]})")
        try:
            if checkpointing:  # the no-grad passes are the same as in the first variant
                passes = {k: variants[False]["transient"][k] for k in ("theta0_pass", "eval_pass")}
                transient = simulate(p, checkpointing, mode, no_grad_passes=False) | passes
            else:
                transient = simulate(p, checkpointing, mode)
            transient["optimizer_step"] = step
        except Exception as e:  # an op without a fake-tensor kernel in some model's code: plan what is known
            incomplete = f"the micro-step could not be run on fake tensors ({type(e).__name__}: {str(e)[:200]})"
            transient = {"step": 0, "theta0_pass": 0, "eval_pass": 0, "optimizer_step": step}
        if method.precomputed:
            transient["labels_pass"] = transient["theta0_pass"]
        transient["twin"] = bool(cfg.eval.retrained_model or cfg.eval.base_model)  # one frozen model at a time
        transient["kept_off"] = kept_off
        terms, phases = _phases(counts, adapter_params, p.ds_config, p.world_size, mode, needs, transient)
        if audit is not None:
            phases.update(audit.phases())
        variants[checkpointing] = {"terms": terms, "phases": phases, "peak_bytes": max(phases.values()),
                                   "transient": transient, "audit": audit}
    tokens = sum(method.stream_batch_size(n, cfg.train) for n in method.streams) * cfg.data.seq_len
    # The trained forward's [tokens, vocab] logits and their gradient (in the model's dtype; the loss terms upcast
    # row blocks only): part of the simulated transient, shown on its own.
    logits = 2 * tokens * text_config(p.model_config).vocab_size * (4 if precision(p.ds_config) == "fp32" else 2)
    plan = {
        "world_size": p.world_size, "zero_stage": zero_stage(p.ds_config), "precision": precision(p.ds_config),
        "reference_mode": mode, "activation_checkpointing": chosen,
        "parameters": dataclasses.asdict(counts), "adapter_parameters": adapter_params,
        "tokens_per_micro_step": tokens,
        "logits_bytes": logits,
        "terms": variants[chosen]["terms"], "phases": variants[chosen]["phases"],
        "peak_bytes": variants[chosen]["peak_bytes"],
        "peak_phase": max(variants[chosen]["phases"], key=variants[chosen]["phases"].get),
        "other_checkpointing": {"activation_checkpointing": not chosen,
                                "activations, logits, loss terms": variants[not chosen]["terms"][
                                    "activations, logits, loss terms"],
                                "peak_bytes": variants[not chosen]["peak_bytes"]},
        "not_counted": "CUDA context, NCCL buffers, allocator fragmentation (kept free: "
                       f"{HEADROOM:.0%} of --device-memory)",
    }
    if incomplete:
        plan["incomplete"] = f"activations, logits and loss terms are not counted: {incomplete}"
    if device_memory is not None:
        plan.update(fit(plan, variants, counts, adapter_params, p, mode, needs, device_memory))
    return plan


class _Fit:
    """What the fit check's knobs start from: the chosen variant of the plan, and the computation each knob repeats
    with one input changed (recompute the phases, take the peak)."""

    def __init__(self, plan: dict, variants: dict, counts: ModelCounts, adapter_params: int, p, mode: str,
                 needs: bool, budget: int):
        self.plan, self.variants, self.counts, self.adapter_params = plan, variants, counts, adapter_params
        self.p, self.cfg, self.t, self.mode, self.needs, self.budget = p, p.cfg, p.cfg.train, mode, needs, budget
        self.chosen = plan["activation_checkpointing"]
        self.transient = variants[self.chosen]["transient"]
        self.audit: Optional[AuditPlan] = variants[self.chosen]["audit"]
        self.stage, self.zero = zero_stage(p.ds_config), p.ds_config.get("zero_optimization", {})

    def peak(self, ds_config: Optional[dict] = None, world_size: Optional[int] = None, mode: Optional[str] = None,
             audit: Optional[dict] = None, **transient) -> int:
        """The peak with the unlearning run's ZeRO JSON, world size, theta_0 mode or transient bytes changed. The
        audit's phases stay as planned (a knob on the unlearning run leaves them), unless ``audit`` replaces them."""
        _, phases = _phases(self.counts, self.adapter_params, ds_config or self.p.ds_config,
                            world_size or self.p.world_size, mode or self.mode, self.needs, self.transient | transient)
        if audit is None:
            audit = {k: v for k, v in self.plan["phases"].items() if k in AUDIT_PHASES}
        return max(phases.values()) if not audit else max(max(phases.values()), max(audit.values()))


def _eval_batch_knob(f: _Fit):
    b = f.cfg.eval.micro_batch_size
    audit = f.audit.phases(eval_pass=f.audit.transient["eval_pass"] // b) if f.audit else None
    return "set eval.micro_batch_size to 1", f.peak(eval_pass=f.transient["eval_pass"] // b, audit=audit)


def _audit_batch_knob(f: _Fit):
    w = f.p.world_size
    smaller = dataclasses.replace(f.p, cfg=dataclasses.replace(
        f.cfg, audit=dataclasses.replace(f.cfg.audit, relearn_batch_size=w)))
    audit = relearn_audit_plan(smaller, f.chosen, f.audit.transient["eval_pass"]).phases()
    return (f"set audit.relearn_batch_size to {w} (one chunk per device), or run `dsunlearn audit` later on more "
            f"devices", f.peak(audit=audit))


def _cache_knob(f: _Fit):
    # theta_0's and the evaluation's no-grad passes do not depend on the mode: only the micro-step is simulated again.
    step = simulate(f.p, f.chosen, "cache", no_grad_passes=False)["step"]
    return 'set reference.mode to "cache"', f.peak(mode="cache", step=step)


def _micro_batch_knob(f: _Fit):
    b = f.t.micro_batch_size
    return (f"set train.micro_batch_size to 1 and train.grad_accum to {f.t.grad_accum * b} (same global batch)",
            f.peak(step=f.transient["step"] // b, theta0_pass=f.transient["theta0_pass"] // b))


def _offload_knob(f: _Fit):
    offloaded = {**f.p.ds_config, "zero_optimization": {**f.zero, "offload_optimizer": {"device": "cpu"}}}
    return ('offload the optimizer: "offload_optimizer": {"device": "cpu"} in the ZeRO JSON '
            '(ds_configs/zero3_offload.json)', f.peak(ds_config=offloaded, optimizer_step=0))  # the step runs on the host


def _devices_knob(f: _Fit):
    for ranks in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        g = f.p.world_size * ranks
        peak = f.peak(world_size=g, optimizer_step=optimizer_step_bytes(f.counts, f.p.ds_config, g, f.t))
        if peak <= f.budget or ranks == 512:
            return f"run on {g} devices (ZeRO-3 shards the model states over all of them)", peak


KNOBS = (
    # (when it applies, the knob and the peak after it; None: not planned), in the order that costs the run least:
    # knobs that leave the unlearning untouched when their phase is the peak, activation checkpointing (a third more
    # compute), theta_0 as a cache (one pass before training), a smaller micro-batch (more accumulation steps, same
    # batch), optimizer offload (host memory and PCIe traffic), more devices, LoRA (a different method).
    (lambda f: f.plan["peak_phase"] in ("evaluation", "relearn audit evaluation") and f.cfg.eval.micro_batch_size > 1,
     _eval_batch_knob),
    (lambda f: f.plan["peak_phase"] == "relearn audit" and f.cfg.audit.relearn_batch_size > f.p.world_size,
     _audit_batch_knob),
    (lambda f: not f.chosen,
     lambda f: ("set train.activation_checkpointing to true", f.variants[True]["peak_bytes"])),
    (lambda f: f.needs and f.mode == "engine" and "incomplete" not in f.plan, _cache_knob),
    (lambda f: f.t.micro_batch_size > 1, _micro_batch_knob),
    (lambda f: f.stage > 0 and not _offload(f.zero, "offload_optimizer"), _offload_knob),
    (lambda f: f.stage == 3, _devices_knob),
    (lambda f: f.stage != 3, lambda f: ("use ZeRO-3 (ds_configs/zero3.json) to shard the weights too", None)),
    (lambda f: f.cfg.adapter.rank == 0,
     lambda f: ("train a LoRA adapter (adapter.rank, e.g. 16): only the adapters have gradients and optimizer "
                "states", None)),
)
"""The fit check's knobs, walked in order by ``fit``; each changes one thing and says what the peak becomes."""


def fit(plan: dict, variants: dict, counts: ModelCounts, adapter_params: int, p, mode: str, needs: bool,
        device_memory: int) -> dict:
    """Does the plan fit in ``device_memory`` (less ``HEADROOM``)? If not: the terms over budget, largest first,
    and the first knob (``KNOBS``, in the order that costs the run least) that makes it fit, or else the one that
    saves the most."""
    budget = int(device_memory * (1 - HEADROOM))
    peak = plan["peak_bytes"]
    out = {"device_memory": device_memory, "budget_bytes": budget, "fits": peak <= budget}
    if out["fits"] and "incomplete" in plan:  # a lower bound fitting says nothing
        out["fits"] = None
        out["verdict"] = (f"unknown: without the micro-step the peak is {fmt(peak)} of {fmt(budget)} usable; "
                          f"{plan['incomplete']}")
        return out
    if out["fits"]:
        out["verdict"] = f"fits: peak {fmt(peak)} of {fmt(budget)} usable ({fmt(device_memory)} less {HEADROOM:.0%})"
        return out
    terms = variants[plan["activation_checkpointing"]]["terms"]
    out["exceeds"] = [f"{name}: {fmt(v)}" for name, v in sorted(terms.items(), key=lambda kv: -kv[1]) if v > 0][:3]
    f = _Fit(plan, variants, counts, adapter_params, p, mode, needs, budget)
    candidates = [knob(f) for applies, knob in KNOBS if applies(f)]
    fitting = [(knob, new_peak) for knob, new_peak in candidates if new_peak is not None and new_peak <= budget]
    if fitting:
        (out["first_knob"], after), out["knob_fits"] = fitting[0], True
        out["verdict"] = (f"does not fit: peak {fmt(peak)} > {fmt(budget)} usable ({fmt(device_memory)} less "
                          f"{HEADROOM:.0%}); first knob: {out['first_knob']} (peak {fmt(after)})")
    else:
        measured = [c for c in candidates if c[1] is not None]
        (out["first_knob"], after), out["knob_fits"] = min(measured, key=lambda c: c[1]) if measured else \
            (candidates[-1][0], None), False
        out["verdict"] = (f"does not fit: peak {fmt(peak)} > {fmt(budget)} usable ({fmt(device_memory)} less "
                          f"{HEADROOM:.0%}), and no single knob makes it fit; the largest saving: {out['first_knob']}"
                          + (f" (peak {fmt(after)})" if after is not None else ""))
    out["peak_after_knob"] = after
    return out


def plan_table(plan: dict) -> str:
    """The plan as a table for people (``--dry-run`` writes it to stderr; stdout keeps the JSON)."""
    other = plan["other_checkpointing"]
    ac = "on" if plan["activation_checkpointing"] else "off"
    lines = [f"memory plan per device: {plan['world_size']} device(s), ZeRO stage {plan['zero_stage']}, "
             f"{plan['precision']}, theta_0: {plan['reference_mode']}, "
             f"{plan['parameters']['total'] / 1e6:.1f}M parameters ({plan['parameters']['trainable'] / 1e6:.1f}M "
             f"trained), {plan['tokens_per_micro_step']} tokens per micro-step"]
    for name, value in plan["terms"].items():
        lines.append(f"  {name:<36} {fmt(value):>12}")
        if name == "activations, logits, loss terms":
            lines.append(f"  {'  of which logits and their gradient':<36} {fmt(plan['logits_bytes']):>12}")
    lines.append(f"  {'peak (' + plan['peak_phase'] + ' phase)':<36} {fmt(plan['peak_bytes']):>12}   "
                 f"(activation checkpointing {ac}; {'on' if other['activation_checkpointing'] else 'off'}: "
                 f"{fmt(other['peak_bytes'])}, activations etc. {fmt(other['activations, logits, loss terms'])})")
    lines.append("  phases: " + ", ".join(f"{k} {fmt(v)}" for k, v in plan["phases"].items()))
    lines.append(f"  not counted: {plan['not_counted']}")
    if "incomplete" in plan:
        lines.append(f"  INCOMPLETE: {plan['incomplete']}")
    if "verdict" in plan:
        lines.append(f"  {plan['verdict']}")
        for item in plan.get("exceeds", []):
            lines.append(f"    largest: {item}")
    return "\n".join(lines)


def plan_phases(p, zero_path: str, budget: Optional[int] = None) -> tuple[dict, list]:
    """--dry-run of a phased method: the memory plan of its last phase (the run's own, with its evaluations and
    audits: ``memory.plan_memory``) and one row per phase, each with its peak per device. A train phase is planned
    as the run it is (``phase_config``); an edit or arithmetic phase holds, on rank 0's host, one shard of every
    boundary it reads plus the shard it writes (2 for an edit, 4 for an arithmetic: its input, base and moved)."""
    from .phases import INPUT, EditPhase, Earlier, TrainPhase, final_prepared, phase_config
    from .methods import term_weights
    from .zero import resolve_configs
    cfg, method = p.cfg, p.method
    boundaries = {INPUT: cfg.model.path, **{ph.name: f"<phase {ph.name}>" for ph in method.phases()}}
    final = method.final_phase()
    model_bytes = None
    rows = []
    for k, ph in enumerate(method.earlier_phases(), start=1):
        if isinstance(ph, TrainPhase):
            sub = phase_config(cfg, ph, cfg.model.path, Path(cfg.output.run_dir) / "phases" / f"{k}-{ph.name}",
                               boundaries, p.world_size)
            sub_p = dataclasses.replace(p, cfg=sub, ds_config=resolve_configs(sub, zero_path, p.world_size),
                                        method=ph.method, weights=term_weights(ph.method, sub.method), audits=(),
                                        eval_streams={}, num_steps=ph.num_steps)
            plan = plan_memory(sub_p)
            model_bytes = model_bytes or plan["parameters"]["total"] * (4 if precision(p.ds_config) == "fp32" else 2)
            rows.append({"phase": ph.name, "kind": "distil" if ph.teacher else "train", "steps": ph.num_steps,
                         "peak_bytes": plan["peak_bytes"], "where": "every device"})
        else:
            rows.append({"phase": ph.name, "kind": ph.kind, "steps": 0, "peak_bytes": None,
                         "where": "rank 0 host", "shards_in_memory": 2 if isinstance(ph, EditPhase) else 4})
    run_p, engine_p = final_prepared(p, Earlier(boundaries=boundaries))
    plan = plan_memory(dataclasses.replace(engine_p, num_steps=run_p.num_steps), budget,
                       kept_off=final.keep_off is not None)
    rows.append({"phase": final.name, "kind": "distil" if final.teacher else "train" if final.num_steps != 0
                 else "evaluation", "steps": run_p.num_steps, "peak_bytes": plan["peak_bytes"],
                 "where": "every device"})
    for row in rows:  # a shard is at most the whole model (one-file safetensors, as the engines export)
        if row["peak_bytes"] is None and model_bytes is None:
            model_bytes = plan["parameters"]["total"] * (4 if precision(p.ds_config) == "fp32" else 2)
        if row["peak_bytes"] is None:
            row["host_bytes"] = row["shards_in_memory"] * model_bytes
    return plan, rows


def phases_table(rows: list) -> str:
    lines = ["phases of the method:"]
    for k, r in enumerate(rows, start=1):
        peak = fmt(r["peak_bytes"]) + " per device" if r["peak_bytes"] is not None else \
            f"{fmt(r['host_bytes'])} on rank 0's host (at most; one shard at a time)"
        lines.append(f"  {k}. {r['phase']:<10} {r['kind']:<11} {r['steps'] if r['steps'] is not None else '-':>5} "
                     f"steps   peak {peak}")
    return "\n".join(lines)
