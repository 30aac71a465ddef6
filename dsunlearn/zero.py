"""Load a ZeRO JSON from ``ds_configs/`` and fill the keys the run config owns.

The ZeRO JSON owns sharding, offload, precision and communication. The run config owns the batch geometry and
clipping; in the ZeRO JSON those keys must be absent or ``"auto"``. A concrete value that disagrees with the run
config is an error naming both values — never a silent overwrite. The optimizer and scheduler are dsunlearn's
(client AdamW + warmup/cosine), so ``optimizer``/``scheduler`` sections are rejected.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from .config import ConfigError, RunConfig, read_json_object

# Keys the run config derives: ZeRO JSON key -> where it comes from (for messages).
DERIVED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size * train.grad_accum * world_size",
    "gradient_clipping": "train.grad_clip",
}
OWNED_SECTIONS = {
    "optimizer": "dsunlearn builds the optimizer (AdamW) from the run config's train section",
    "scheduler": "dsunlearn builds the LR schedule from train.schedule / train.warmup_ratio",
    # DeepSpeed's section configures deepspeed.checkpointing, which Hugging Face models never call: it would do nothing.
    "activation_checkpointing": "set train.activation_checkpointing in the run config (transformers' per-layer "
                                "recompute; DeepSpeed's section has no effect on Hugging Face models)",
}


def load_zero_json(path: str) -> dict:
    return read_json_object(path, "ZeRO config")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def precision(ds_config: dict) -> str:
    """"bf16", "fp16" or "fp32", as the ZeRO JSON asks."""
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled") is True:
            return name
    return "fp32"


def resolve(ds_config: dict, cfg: RunConfig, world_size: int, source: str = "ZeRO config") -> dict:
    """Return a copy of ``ds_config`` with the derived keys filled in; raise ConfigError on any conflict."""
    resolved = copy.deepcopy(ds_config)
    t = cfg.train
    if t.global_batch_size is not None and t.global_batch_size != t.micro_batch_size * t.grad_accum * world_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} but train.micro_batch_size ({t.micro_batch_size}) x "
            f"train.grad_accum ({t.grad_accum}) x world size ({world_size}) = "
            f"{t.micro_batch_size * t.grad_accum * world_size}")
    wanted: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(t.grad_clip),
    }
    for section, why in OWNED_SECTIONS.items():
        if section in resolved:
            raise ConfigError(f"{source}: remove the '{section}' section: {why}")
    for key, value in wanted.items():
        given = resolved.get(key, "auto")
        if given != "auto" and not _same(given, value):
            raise ConfigError(f"{source}: {key}={json.dumps(given)} conflicts with the run config "
                              f"({DERIVED_KEYS[key]} gives {json.dumps(value)}); set it to \"auto\" or remove it")
        resolved[key] = value
    for name in ("bf16", "fp16"):
        if resolved.get(name, {}).get("enabled") == "auto":
            raise ConfigError(f"{source}: {name}.enabled must be true or false (the ZeRO config owns precision)")
    if resolved.get("bf16", {}).get("enabled") is True and resolved.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{source}: bf16 and fp16 are both enabled; choose one")
    zero = resolved.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {json.dumps(stage)}")
    for key, value in list(zero.items()):
        if value == "auto":
            # HF's "auto" bucket sizes need the model's hidden size; dsunlearn does not guess them.
            raise ConfigError(f"{source}: zero_optimization.{key} is \"auto\"; dsunlearn only derives "
                              f"{', '.join(DERIVED_KEYS)}: give a number")
    # Our optimizer is a client torch AdamW: DeepSpeed must accept it without compiling FusedAdam.
    resolved.setdefault("zero_allow_untested_optimizer", True)
    resolved.setdefault("steps_per_print", 10**9)  # dsunlearn logs every step itself
    return resolved


def reference_config(trained: dict) -> dict:
    """The frozen reference engine's config (trl's rule): same ZeRO-3 sharding when stage 3, else a plain replica.

    No optimizer, no offload of optimizer state, no monitors or profiler (DeepSpeed 0.19 would register them twice).
    """
    ref = {
        "train_micro_batch_size_per_gpu": trained["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": trained["gradient_accumulation_steps"],
        "train_batch_size": trained["train_batch_size"],
        "steps_per_print": 10**9,
    }
    for name in ("bf16", "fp16"):
        if name in trained:
            ref[name] = {"enabled": trained[name].get("enabled", False)}
    zero = trained.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        ref["zero_optimization"] = {k: v for k, v in zero.items() if k not in ("offload_optimizer",)}
    else:
        ref["zero_optimization"] = {"stage": 0}
    return ref


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def resolve_configs(cfg: RunConfig, zero_path: str, world_size: int) -> dict:
    """The ZeRO JSON at ``zero_path``, resolved against the run config for ``world_size`` ranks."""
    return resolve(load_zero_json(zero_path), cfg, world_size, source=zero_path)
