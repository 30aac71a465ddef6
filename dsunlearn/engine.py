"""Everything that touches DeepSpeed and torch.distributed: process group, engines, collectives, export.

Methods and metrics never import this module's dependencies; they see tensors only.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Optional

import torch

from .config import ConfigError, RunConfig
from .data import follow_umask
from .schedule import lr_factor
from .zero import precision, zero_stage

log = logging.getLogger(__name__)

# torch 2.13 warns on every ZeRO step that DeepSpeed's collectives use deprecated names; keep the log readable.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated.*")
warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*deprecated.*")
warnings.filterwarnings("ignore", message=".*_all_gather_base.*")
warnings.filterwarnings("ignore", message=".*_reduce_scatter_base.*")


# ---------------------------------------------------------------------------------------------------------------------
# Process group

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def standalone_env(**overrides: str) -> dict:
    """The environment for a child ``python -m dsunlearn`` that is a world of one of its own: this process's
    environment without the launcher's rank variables, which ``_map_launcher_env`` may have set here (the child would
    otherwise try to join this process's world, on its port)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own detection needs it spelt out on a CPU machine
    return {**env, **overrides}


def _map_launcher_env() -> None:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* exist whatever started us.

    - deepspeed / torchrun set them already.
    - mpirun (Open MPI) sets OMPI_COMM_WORLD_*: map them (MASTER_ADDR/PORT must come from the launcher script,
      see launchers/mpirun.sh), which avoids DeepSpeed's MPI discovery and its non-loopback address choice.
    - a plain ``python -m dsunlearn`` is a world of one on a free loopback port.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return
    if "OMPI_COMM_WORLD_RANK" in env:
        env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
        env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError("mpirun: export MASTER_ADDR and MASTER_PORT to every rank (see launchers/mpirun.sh)")
        return
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def init_distributed() -> None:
    """Start (or join) the process group through DeepSpeed's accelerator API: gloo on CPU, nccl/… on GPUs."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    _map_launcher_env()
    backend = None
    if accelerator_name() == "cpu":
        backend = "gloo"
        # ZeRO never uses the shared-memory comm op, but init_distributed JIT-builds it (75-130 s) on CPU.
        # Private API in 0.19.x: guarded, and only for CPU runs.
        with contextlib.suppress(Exception):
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if accelerator_name() != "cpu":
        from deepspeed.accelerator import get_accelerator
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    """Destroy the process group before the interpreter exits (the launcher path only: in-process callers of
    ``cli.main`` keep theirs). PyTorch warns that a group left to interpreter teardown can, in rare cases, make the
    process exit non-zero after its work is done; one such exit (250, after a completed run) was seen once in CI."""
    import datetime
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a failed teardown must not turn a finished run into a failure
            # Every rank tears down together: a rank that destroyed its gloo group while another was still
            # finishing was seen to abort at exit ("terminate called without an active exception", code 250).
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
            dist.destroy_process_group()


def rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over ranks (on the CPU for gloo, on the device otherwise)."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    dev = device()
    out = values.to(dev)
    dist.all_reduce(out)
    return out.cpu()


def all_gather_objects(obj) -> list:
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class FailedElsewhere(RuntimeError):
    """A part that every rank takes together failed on another rank: this rank stops too instead of waiting for it
    in the next collective (that rank's log has the error)."""


def any_rank_failed(failed: bool) -> bool:
    """One all-reduce: did this rank or any other fail? Every rank must call it at the same point."""
    return bool(all_reduce_sum(torch.tensor([1.0 if failed else 0.0], dtype=torch.float64))[0].item() > 0)


@contextlib.contextmanager
def together(what: str):
    """A block whose failure on one rank reaches every rank: at its end one all-reduce (also a barrier) tells each
    rank whether the block failed anywhere; the rank that failed re-raises its error, the others raise
    ``FailedElsewhere``. For rank-0-only work (a write, a hash) followed by collective work: without it the other
    ranks would wait in that collective forever."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    if any_rank_failed(error is not None):
        if error is not None:
            raise error
        raise FailedElsewhere(f"{what} failed on another rank (see its log)")


def from_main(compute, what: str):
    """``compute()`` on rank 0, its result on every rank. When it raises there, every rank raises: a
    ``ConfigError`` as itself (the user's one-line error, exit code 2 everywhere), anything else as
    ``FailedElsewhere`` on the other ranks, so no rank waits in the broadcast."""
    outcome, error = None, None
    if is_main():
        try:
            outcome = ("ok", compute())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
            outcome = ("config" if isinstance(e, ConfigError) else "error", str(e))
    status, value = broadcast_object(outcome)
    if status == "ok":
        return value
    if error is not None:
        raise error
    raise ConfigError(value) if status == "config" else FailedElsewhere(f"{what} failed on rank 0: {value}")


@contextlib.contextmanager
def main_process_first():
    """Rank 0 does the work first (filling caches), the others then read what it wrote."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---------------------------------------------------------------------------------------------------------------------
# Models and engines

def torch_dtype(ds_config: dict) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision(ds_config)]


_UNCHECKED_WEIGHTS: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("unchecked_weights", default=None)


@contextlib.contextmanager
def weights_not_checked():
    """For ``--dry-run``, which reads no weights: inside, ``check_model_dir`` lets a model directory without weights
    (config.json and the tokenizer only, enough for the memory plan) pass and records the refusal a real run would
    give instead. Yields that list of messages (one per directory)."""
    notes: list = []
    token = _UNCHECKED_WEIGHTS.set(notes)
    try:
        yield notes
    finally:
        _UNCHECKED_WEIGHTS.reset(token)


def check_model_dir(cfg: RunConfig) -> None:
    """Fail early, on one line, for the model-directory mistakes a user makes. Inside ``weights_not_checked`` a
    directory without weights is recorded there instead of refused."""
    path = Path(cfg.model.path)
    if not cfg.model.path:
        raise ConfigError("model.path: required (a local Hugging Face model directory)")
    if not path.is_dir():
        raise ConfigError(f"model.path: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} has no config.json")
    names = [p.name for p in path.iterdir()]
    if cfg.model.init == "random":
        return
    if cfg.model.use_safetensors and not any(n.endswith(".safetensors") for n in names):
        other = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        hint = (f" (found {', '.join(other)}: pickle files run code when loaded; convert them, or set "
                f"model.use_safetensors=false only if you trust them)") if other else ""
        message = f"model.path: {path} has no .safetensors weights{hint}"
        unchecked = _UNCHECKED_WEIGHTS.get()
        if unchecked is None:
            raise ConfigError(message)
        if message not in unchecked:
            unchecked.append(message)


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer
    path = cfg.model.tokenizer or cfg.model.path
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {path} ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        # Padding is masked from every loss, so any id works; EOS is the usual choice for causal LMs.
        tok.pad_token = tok.eos_token
    return tok


def load_model_config(cfg: RunConfig):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot read {cfg.model.path}/config.json ({str(e).splitlines()[0]})") from None


def check_model_tokenizer(model_config, tokenizer, seq_len: int, source: str = "model.path") -> None:
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"{source}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}")
    max_pos = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's maximum of {max_pos} positions")


def load_model(cfg: RunConfig, ds_config: dict, path: Optional[str] = None):
    """Load a causal LM for a DeepSpeed engine.

    Under ZeRO-3, ``HfDeepSpeedConfig`` must be alive during ``from_pretrained`` so transformers loads straight into
    partitioned parameters: no rank ever holds the full model. The returned handle keeps it alive.
    """
    from transformers import AutoModelForCausalLM
    handle = None
    if cfg.model.init == "random" and path is None:
        # Built whole on every rank from the same seed, then partitioned by deepspeed.initialize: zero.Init (what
        # HfDeepSpeedConfig switches on) would skip transformers' weight initialisation.
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForCausalLM.from_config(load_model_config(cfg), dtype=torch_dtype(ds_config),
                                                 trust_remote_code=cfg.model.trust_remote_code)
        model.config.use_cache = False
        return model, None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig
        handle = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        path or cfg.model.path, dtype=torch_dtype(ds_config), trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=cfg.model.use_safetensors)
    # KV caches are for generation; training and scoring forwards never reuse them.
    model.config.use_cache = False
    return model, handle


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them.

    transformers' gradient checkpointing in its non-reentrant form: gradients still reach parameters when a layer's
    inputs do not require grad (RMU trains three MLP projections of an otherwise frozen model), and under ZeRO-3 the
    engine's hooks gather each layer's parameters again for its recompute. Active only in training mode, so no-grad
    evaluation and reference passes are unaffected.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support gradient "
                          f"checkpointing; set it to false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_train_engine(model, ds_config: dict, cfg: RunConfig, num_steps: int):
    """deepspeed.initialize with a client AdamW and the warmup + cosine/constant schedule (dsunlearn.schedule)."""
    import deepspeed

    t = cfg.train
    if t.activation_checkpointing:
        enable_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters (did a method's parameter pattern match nothing?)")
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)

    def factor(step: int) -> float:
        # A plain function, as before, so LambdaLR.state_dict (hence the checkpoint) stores nothing for it.
        return lr_factor(step, num_steps, t.warmup_ratio, t.schedule, t.min_lr_ratio)

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    return engine


def build_frozen_engine(model, ds_config: dict):
    """A no-optimizer engine for the frozen reference model (ZeRO-3 sharded like the trained one)."""
    import deepspeed
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def consolidated_state_dict(engine) -> Optional[dict]:
    """Full state dict on rank 0 (None elsewhere). Under ZeRO-3 the parameters are gathered one module at a time."""
    if engine.zero_optimization_partition_weights():
        # Private in 0.19.x, but it is what save_16bit_model calls, without requiring
        # stage3_gather_16bit_weights_on_model_save in the user's ZeRO JSON (that key is theirs).
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module_state_dict()
    return sd if is_main() else None


def gathered_for_update(params: list):
    """A context in which ``params`` are whole on every rank and what rank 0 writes into them is kept (ZeRO-3:
    gathered, then re-partitioned from rank 0's copy on exit; otherwise every rank edits its own replica, so every
    rank must make the same edit)."""
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def replace_dir(out: Path, write) -> None:
    """``write(tmp)`` into a temporary directory, then swap it in for ``out`` (a reader never sees half a model)."""
    import shutil
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    follow_umask(tmp)  # model.safetensors arrives 0600 (data.follow_umask)
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def export_hf_model(engine, tokenizer, out_dir: str, adapter_dir: Optional[str] = None) -> Optional[str]:
    """Write the engine's weights as a Hugging Face safetensors directory, atomically (temp dir + rename).

    A LoRA-adapted model (``adapter.py``) is written merged, loadable without peft; ``adapter_dir`` also gets the
    adapter alone (peft format). Every rank must call this (ZeRO-3 gathers are collective); rank 0 writes.
    """
    from .adapter import is_adapted, merged_state_dict
    state_dict = consolidated_state_dict(engine)
    # Rank 0 writes; a failure there (disk full) must reach the other ranks, not leave them in the next collective.
    with together("writing the model"):
        if is_main():
            module = engine.module
            if is_adapted(module):
                if adapter_dir is not None:
                    replace_dir(Path(adapter_dir), lambda tmp: module.save_pretrained(tmp, state_dict=state_dict))
                state_dict = merged_state_dict(state_dict, module)
                module = module.get_base_model()

            def write(tmp: Path) -> None:
                module.config.use_cache = True
                module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                module.config.use_cache = False
                tokenizer.save_pretrained(tmp)
            replace_dir(Path(out_dir), write)
    return out_dir


def reset_peak_memory() -> None:
    """Start a new peak-memory window (``peak_memory``): the accelerator's allocator peak, and on CPU the process's
    resident-set high-water mark (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory() -> Optional[int]:
    """Peak bytes since ``reset_peak_memory``: allocated accelerator memory on a GPU, else resident host memory
    (VmHWM); None where neither can be read."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return None


def adapter_dir(cfg: RunConfig) -> Optional[str]:
    """Where the adapter alone is exported (``adapter.save_adapter``), else None."""
    return str(Path(cfg.output.run_dir) / "adapter") if cfg.adapter.rank > 0 and cfg.adapter.save_adapter else None


def forward(engine, batch: dict, output_hidden_states: bool = False):
    dev = engine.device
    return engine(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                  output_hidden_states=output_hidden_states, use_cache=False)


def forget_zero3_release_decisions() -> None:
    """Work around a DeepSpeed 0.19.8 ZeRO-3 bug before each training step.

    ``PartitionedParameterCoordinator.__params_to_release`` is memoised with ``functools.lru_cache`` keyed by
    (coordinator, module, step id) and never cleared when the module trace is invalidated and re-recorded. After no-grad
    forwards on the trained engine (the evaluation before step 1, theta_0 passes for caches and labels) the decisions
    taken from that forward-only trace ("nothing needs these parameters later: release them") outlive it, and every
    later step releases the parameters after the forward and gathers them all again in the backward: 2 model copies
    all-gathered per step instead of 1 (measured by benchmarks/bench_fused.py --nograd-before). The loop clears it at
    the start of the first two optimizer steps after such forwards (``loop.RELEASE_MEMO_STEPS``: one is not enough,
    every step costs ~12% of a step). Private API: guarded, a no-op where it does not exist.
    """
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC
        wrapped = PPC._PartitionedParameterCoordinator__params_to_release  # behind an nvtx wrapper (no __wrapped__)
        for cell in wrapped.__closure__ or ():
            if hasattr(cell.cell_contents, "cache_clear"):
                cell.cell_contents.cache_clear()
    except (ImportError, AttributeError, ValueError):
        pass


def _destroy(engine) -> None:
    try:
        engine.destroy()
    except Exception as e:  # noqa: BLE001 - a failed release costs memory, not the caller's work
        log.warning("DeepSpeedEngine.destroy() failed: %s", e)
    forget_zero3_release_decisions()  # the memo holds the engine's coordinator and model


def release_engine(engine) -> None:
    """Unhook one engine (a frozen model scored once: the retrained twin, a chain's original) while the run's engines
    stay in use; its memory is freed once the caller has dropped its last reference to it and ``collect`` has run
    (``eval.runner.frozen_engine`` does all three). Without it the engine's weight shards stay alive for the whole run,
    held by DeepSpeed's hooks and module stack (``release_engines``): measured +508 MiB per rank through every
    training step at 133M parameters in fp32 (benchmarks/RESULTS.md section 10)."""
    _destroy(engine)
    with contextlib.suppress(ImportError, AttributeError):
        from deepspeed.runtime.zero import parameter_offload
        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not engine.module]


def collect() -> None:
    """Free what released engines left behind: a garbage collection (an engine is a web of reference cycles, so
    dropping the last reference is not enough), then the accelerator's cache."""
    import gc
    gc.collect()
    with contextlib.suppress(Exception):  # accelerators without a cache (CPU)
        from deepspeed.accelerator import get_accelerator
        get_accelerator().empty_cache()


def release_engines() -> int:
    """Free every DeepSpeed engine of this process (weight shards, optimizer states) once no engine is in use, e.g.
    between the runs of ``dsunlearn sweep``. Returns how many engines are still alive afterwards (0 expected).

    Dropping the last reference is not enough in DeepSpeed 0.19.8 (found by walking the object graph): the gradient
    hooks ZeRO-3 registers on parameters are held in C++, invisible to the garbage collector, and close over the
    optimizer (only ``engine.destroy()`` removes them); the ``__params_to_release`` memo (see
    ``forget_zero3_release_decisions``) keys on the coordinator and the model; and every engine's root module is pushed
    onto the module-global ``parameter_offload.FWD_MODULE_STACK`` at setup and never popped (empty between forwards
    otherwise). Measured without this: +1 live engine per ga run, +2 per ga_kl run (trained + reference) in one process.
    """
    import gc
    from deepspeed.runtime.engine import DeepSpeedEngine

    def live() -> list:
        # type(o), not isinstance: isinstance reads o.__class__, which some lazy module proxies answer with warnings.
        return [o for o in gc.get_objects() if issubclass(type(o), DeepSpeedEngine)]

    gc.collect()
    engines = live()
    while engines:
        _destroy(engines.pop())
    with contextlib.suppress(ImportError, AttributeError):
        from deepspeed.runtime.zero import parameter_offload
        parameter_offload.FWD_MODULE_STACK.clear()
    collect()
    return len(live())
