"""The run config: one JSON file -> a tree of frozen dataclasses.

The run config owns every knob of an unlearning run (model, data, method, optimisation, evaluation, checkpoints).
The ZeRO JSON in ``ds_configs/`` owns sharding, offload, precision and communication (see ``zero.py``).
Each field's docstring is the documentation: ``dsunlearn unlearn --help-config`` prints them.

Overrides: ``--set section.key=value``; the value is parsed as JSON when it parses (``1e-5``, ``true``, ``[1,2]``,
``null``) and as a plain string otherwise, then checked against the field's type.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .cost import KNOWN_PRETRAINING
from .errors import ConfigError  # noqa: F401  (raised everywhere as config.ConfigError)
from .muse import resolve_muse
from .schedule import SCHEDULES


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str = ""
    """Local Hugging Face model directory (config.json + safetensors). Nothing is downloaded from a hub."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; defaults to ``path``."""
    trust_remote_code: bool = False
    """Allow the model directory to run its own Python code. Off unless you trust the directory."""
    use_safetensors: bool = True
    """Load weights only from safetensors files (no pickle). Turn off only for trusted ``.bin`` checkpoints."""
    init: str = "pretrained"
    """"pretrained" loads the weights; "random" builds the architecture from config.json with train.seed
    (``dsunlearn pretrain`` uses it to train the demo world's models from scratch)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    forget: str = ""
    """Forget set: JSONL, parquet, a folder of .txt files, or a ``datasets.save_to_disk`` folder."""
    retain: Optional[str] = None
    """In-distribution retain set (same domain as the forget set)."""
    approximate: Optional[str] = None
    """Unseen in-distribution text: the approximate-retrain target of evaluation and the stop rule."""
    general: Optional[str] = None
    """General-domain text (the study's "general retain data"; also evaluated)."""
    train: Optional[str] = None
    """Training corpus of ``dsunlearn pretrain`` (plain next-token descent from scratch)."""
    forget_per_batch: int = 0
    """``dsunlearn pretrain`` only: forget chunks (``data.forget``) added to every micro-step's batch of
    ``data.train`` chunks, in the same fused forward, for an original model whose exact-retrain twin is the same run
    with 0 (its train batches are the same: each stream draws its own chunks from its own seed). 0 = train only."""
    muse: Optional[str] = None
    """A local copy of one MUSE corpus (Shi et al. 2024; e.g. ``.../MUSE-News``, ``.../data/news``), in MUSE's layout
    and field names: ``raw/forget``, ``raw/retain1`` (else ``retain2``), ``raw/holdout`` become ``forget``,
    ``retain`` and ``approximate``; ``verbmem/forget``, ``knowmem/forget_qa``, ``knowmem/retain_qa`` (else
    ``retain2_qa``) become ``eval.verbmem_file``, ``eval.knowmem_forget`` and ``eval.knowmem_retain``. Each file may
    be .json, .jsonl, .parquet or .txt (raw); set none of those fields yourself (dsunlearn/muse.py)."""
    retain_source: str = "retain"
    """Which set feeds a method's retain stream: "retain" (in-distribution) or "general"."""
    text_field: str = "text"
    """Field holding the document text in JSONL/parquet/saved datasets."""
    seq_len: int = 4096
    """Tokens per chunk (the study used 4096). Documents are cut into chunks of this length, never packed together."""
    min_chunk_tokens: int = 16
    """Chunks with fewer real tokens are dropped (and counted in the log)."""
    add_eos: bool = True
    """Append the tokenizer's EOS token to every document before chunking."""
    num_proc: Optional[int] = None
    """Worker processes for tokenisation (datasets.map); None = one process."""


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    name: str = "ga_gd"
    """Registry key of the unlearning method (see ``dsunlearn methods`` and docs/methods.md)."""
    weights: dict = field(default_factory=dict)
    """Weight per named loss term, e.g. {"forget": 1.0, "retain": 1.0}; missing terms weigh 1.0."""
    params: dict = field(default_factory=dict)
    """Method hyperparameters overriding its paper defaults (checked against the method's dataclass)."""


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig:
    mode: str = "auto"
    """How methods that need the frozen original model get it: "engine" (a second ZeRO-3 engine, one no-grad
    forward per micro-step), "cache" (its outputs computed once before training and stored) or "adapters_off" (with
    an adapter: the trained model with its adapters switched off, one extra no-grad forward, nothing else in memory).
    "auto" = "adapters_off" with an adapter, else "engine"."""
    topk: int = 64
    """Cached KL: keep the reference's top-k log-probs per position plus the remaining mass (exact when k = vocab)."""
    path: Optional[str] = None
    """theta_0's model directory when it is not ``model.path`` (mode "engine" only): in a chain of removal requests
    (``--after``), the original model instead of the previous request's result (docs/methods.md)."""
    cache_dir: Optional[str] = None
    """Where reference caches and precomputed labels (random/adversarial) are stored, keyed by a content hash of
    (model, data, settings) and rebuilt when it changes; default ``<run_dir>/../.cache/dsunlearn``. Every rank must
    see it (a shared filesystem on multi-node jobs)."""


REFERENCE_MODES = ("engine", "cache", "adapters_off")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """LoRA unlearning (``dsunlearn/adapter.py``, the ``peft`` package): only low-rank adapters train."""
    rank: int = 0
    """LoRA rank r; 0 = no adapter (every weight trains)."""
    alpha: float = 16.0
    """LoRA alpha: the adapters' output is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: tuple = ()
    """Module names (or name suffixes) that get adapters; empty = every linear layer of the decoder blocks (attention
    and MLP projections, not the LM head), or for RMU the layers its ``trainable_params`` select."""
    save_adapter: bool = False
    """Also write the adapter alone (peft format) to ``<run_dir>/adapter``; ``<run_dir>/model`` always holds the
    merged weights, which load with plain transformers."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    lr: float = 2e-5
    """Peak learning rate (study default 2e-5)."""
    schedule: str = "cosine"
    """"cosine" (decays to min_lr_ratio*lr) or "constant", both after a linear warmup."""
    warmup_ratio: float = 0.03
    """Fraction of steps with linear warmup (study: 3%). The first step's LR is lr/num_warmup_steps, never 0."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW weight decay (study: 0)."""
    betas: tuple = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables). Written into the ZeRO config as gradient_clipping."""
    micro_batch_size: int = 1
    """Forget chunks per rank per micro-step (the retain stream gets micro_batch_size * retain_ratio)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    global_batch_size: Optional[int] = None
    """Forget chunks per optimizer step; if set it must equal micro_batch_size * grad_accum * world_size."""
    retain_ratio: int = 1
    """Retain chunks per forget chunk in each fused batch (study: 1:1)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them all (transformers' gradient
    checkpointing, non-reentrant): about a third more compute, activation memory of roughly one layer instead of
    every layer. Turn it on for billion-parameter models at long chunks; the losses are the same either way."""
    num_steps: Optional[int] = None
    """Optimizer steps; default derived from epochs over the forget set."""
    epochs: float = 1.0
    """Passes over the forget set when num_steps is not given (study: 1 epoch)."""
    seed: int = 42
    """Seed for data order, random labels and initialisation of anything random."""


EVAL_SPLITS = ("forget", "retain", "approximate", "general")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every_n_steps: int = 0
    """Evaluate every N optimizer steps during unlearning (0 = only before and after)."""
    splits: tuple = EVAL_SPLITS
    """Splits evaluated (those without data are skipped)."""
    max_chunks: Optional[int] = None
    """Evaluate at most this many chunks per split (None = all)."""
    micro_batch_size: int = 4
    """Chunks per rank per evaluation forward."""
    stop_tolerance: float = 0.0
    """Stop rule: stop at the first evaluation where the forget loss has reached ``target - stop_tolerance`` (nats; a
    one-sided crossing) and export the evaluated step (never step 0) that best meets the verdict's criteria
    (docs/evaluation.md). Also the slack of the verdict's forget criterion. 0 disables the rule; > 0 needs
    ``every_n_steps`` > 0."""
    stop_target: str = "original_approximate"
    """The forget-loss target: "original_approximate" (the original model's loss on unseen in-distribution text:
    the study's approximate-retrain target, fixed before unlearning starts), "current_approximate" (the approximate
    loss of the model being unlearned: moves as the model degrades, so a wrecked model can meet it) or
    "retrained_forget" (the exactly retrained model's forget loss; needs eval.retrained_model)."""
    auc_band: Optional[float] = None
    """Verdict: the strongest membership attack's AUC may exceed the unseen-like level (the twin's strongest attack,
    else 0.5) by at most this; None = two standard deviations of a random scorer's AUC at the evaluated set sizes
    (at least 0.05)."""
    utility_tolerance: float = 0.03
    """Verdict: retain and approximate loss may rise by at most this fraction of the original model's."""
    retrained_model: Optional[str] = None
    """An exactly retrained model (the demo world has one): every figure is reported for it too."""
    base_model: Optional[str] = None
    """The model before it ever saw the forget set, when one exists (the checkpoint a fine-tune or continued
    pretraining started from): a user has it, a twin they do not. It measures how the forget text differs from the
    approximate text by nature: the "original_approximate" target moves by the base's forget - approximate loss gap,
    and without a twin the unseen-like attack levels are the base's attack AUCs instead of 0.5 (docs/evaluation.md,
    "Without a twin"). The token-row edit (``token_rows``, ``negate_repair``) puts its rows back to the base's."""
    mia: bool = True
    """Run the membership-inference attacks (forget = members, approximate = non-members)."""
    split_check: bool = True
    """Check that the approximate set differs from the forget set in membership only (blind baseline, loss gap)."""
    split_check_auc_band: float = 0.15
    """The blind baseline passes when its AUC is within 0.5 +- band (its noise is ~0.07 at 50 documents per set)."""
    selection_fraction: float = 0.5
    """With the stop rule on: the fraction of each split's documents (seeded) on which the exported step is chosen;
    the verdict is reported on the other documents, as validation and test sets. 0 chooses and reports on all
    chunks (an optimistic verdict)."""
    allow_unjudged: bool = False
    """With the stop rule on, a run whose evaluation before unlearning cannot judge the forget set (it already looks
    unseen, or the split check failed) stops before the first step, exports nothing and exits with code 4. True
    trains anyway (the stop rule then has nothing sound to stop on)."""
    memorisation_prefix: int = 32
    """Verbatim memorisation, teacher-forced, on every evaluated split: the first N tokens of each chunk are the
    prompt, the rest the continuation scored by exact memorisation and extraction strength (eval/metrics.py,
    docs/evaluation.md). 0 turns both off."""
    generation_prompts: int = 16
    """Generated metrics (eval/memorisation.py), once at the end of ``unlearn`` for the state before, the exported
    model and the twin, and in ``dsunlearn eval``: at most N prompts per metric and split. VerbMem (MUSE) on the
    forget, approximate and retain splits (each chunk cut after ``memorisation_prefix`` tokens; the report part
    when the run chooses a step), KnowMem on ``knowmem_forget`` / ``knowmem_retain``. 0 turns generation off."""
    verbmem_tokens: int = 128
    """Most tokens VerbMem decodes per prompt (MUSE: 128); a chunk's true continuation caps it."""
    verbmem_file: Optional[str] = None
    """MUSE's verbmem prompts (JSON list or JSONL of ``{"prompt", "gt"}``, e.g. ``verbmem/forget.json``): forget
    VerbMem decodes these prompts and scores against ``gt`` instead of cutting forget chunks."""
    knowmem_forget: Optional[str] = None
    """KnowMem questions on the forget side (JSON list or JSONL of ``{"question", "answer"}``, MUSE's
    ``knowmem/forget_qa.json``): knowledge that should be gone. A file ``<name>_icl<.ext>`` beside it holds the
    in-context examples put before each question (MUSE's layout); none when it is absent."""
    knowmem_retain: Optional[str] = None
    """KnowMem questions on the retain side (MUSE's ``knowmem/retain_qa.json``): knowledge that must stay (MUSE's
    utility)."""
    knowmem_tokens: int = 32
    """Most tokens of a KnowMem answer (MUSE: 32); the answer ends at the first line break."""
    audits: tuple = ()
    """Audits run on the exported model at the end of ``unlearn`` (``"relearn"``, ``"quantize"``; settings in the
    ``audit`` section): does the forgetting survive a short fine-tune or 8/4-bit weights? See docs/evaluation.md."""


AUDITS = ("relearn", "quantize")


def relearn_rates(audit, train_lr: float) -> tuple:
    """The relearning audit's fine-tune learning rates: ``audit.relearn_lr`` as a tuple, or ``(train_lr,)``."""
    lr = audit.relearn_lr
    return (train_lr,) if lr is None else tuple(lr) if isinstance(lr, tuple) else (lr,)


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """``dsunlearn audit`` and ``eval.audits``: is the forgetting lasting, measured against the retrained twin?"""
    relearn_steps: int = 20
    """Relearning audit: optimizer steps of the fine-tune (the same batches for the model and its baseline)."""
    relearn_data: str = "forget"
    """What the fine-tune trains on: "forget" (the documents of the forget set not held out), "retain", "general",
    or the path of a JSONL file. The relearning is measured on the held-out forget documents (all of them when the
    fine-tune data is not the forget set)."""
    relearn_fraction: float = 0.5
    """With relearn_data="forget": the fraction of forget documents fine-tuned on (a seeded document-level split)."""
    relearn_lr: Optional[float | tuple] = None
    """Fine-tune learning rate (constant, no warm-up), or a list of rates: the model and its baseline are fine-tuned
    at each, every rate is reported, and the worst case decides (the model must not relearn faster than the baseline
    at any of them; UNDO, Lee et al. 2025, takes the worst of ten). None = train.lr."""
    relearn_batch_size: int = 8
    """Chunks per fine-tune step over all ranks (a multiple of the world size): 1 rank and N ranks see the same."""
    relearn_within: float = 0.5
    """"Relearned" = the held-out forget loss is back within this fraction of the way from the original model's
    (0) to the baseline's before the fine-tune (1): 0.5 = half of the forgetting undone."""
    quantize_bits: tuple = (8, 4)
    """Quantization audit: weight bit widths (round-to-nearest, symmetric, weight-only; torchao)."""
    quantize_group_size: int = 128
    """Weights per quantization scale along the input dimension, >= 2 (a matrix whose width it does not divide gets one
    scale per row; the audit counts the matrices per group size used)."""


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    forget_loss_ceiling: Optional[float] = None
    """Stop when the forget loss exceeds this (nats): gradient ascent is unbounded. None = no ceiling."""
    stop_on_nonfinite: bool = True
    """Stop cleanly after ``max_consecutive_skips`` optimizer steps in a row were skipped for a non-finite gradient
    (DeepSpeed discards such a step and keeps the weights), exporting the last good weights; exit code 3."""
    max_consecutive_skips: int = 5
    """Skipped steps in a row that end the run. One skipped step (an fp16 overflow while the loss scale settles, one
    bad micro-batch) is logged (``skipped_steps``) and the run goes on."""


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every_n_steps: int = 0
    """Save a resumable DeepSpeed checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""


@dataclass(frozen=True, kw_only=True)
class CostConfig:
    pretrain_tokens: Optional[float] = None
    """Tokens the model was pretrained on (D in the retraining estimate 6*N*D, N the matmul weights: non-embedding
    plus the d*V logits matrix, as on the unlearning side); None = no retraining comparison."""
    known_model: Optional[str] = None
    """Or a key of dsunlearn.cost.KNOWN_PRETRAINING (e.g. "yi-6b"): a convenience table, not a source of truth."""


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    run_dir: str = "runs/unlearn"
    """Run directory: resolved configs, log.jsonl, TensorBoard events, checkpoints, the final model."""
    save_model: bool = True
    """Export the final weights as a Hugging Face safetensors directory ``<run_dir>/model``."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        # A default that depends on another field, made concrete (the run directory's config.json records it):
        # reference.mode "auto" -> "adapters_off" with an adapter, else "engine".
        if self.reference.mode == "auto":
            mode = "adapters_off" if self.adapter.rank > 0 else "engine"
            object.__setattr__(self, "reference", dataclasses.replace(self.reference, mode=mode))


# ---------------------------------------------------------------------------------------------------------------------
# Building dataclasses from JSON with exact errors.

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotated type ``tp`` (the small set used in this module) and normalise it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for i, option in enumerate(inner):  # the first type that takes the value (float before tuple: 1e-3 or [..])
            try:
                return _coerce(value, option, where)
            except ConfigError:
                if i == len(inner) - 1:
                    raise ConfigError(f"{where}: expected {' or '.join(map(_type_name, inner))}, got "
                                      f"{json.dumps(value)}") from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object with keys {sorted(f.name for f in fields(tp))}, "
                              f"got {json.dumps(value)}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    else:  # pragma: no cover - a field type this module does not use
        raise AssertionError(f"unsupported config type {tp!r} at {where}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {json.dumps(value)}")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys fail with the list of valid ones."""
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(valid))}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The JSON-ready dict of a config tree (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-5"`` -> (["train", "lr"], 1e-05). Values parse as JSON when they can, else stay strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to the raw JSON dict (validation happens when the dataclasses are built).

    A value that parsed as a number/bool but lands on a string field stays a string (``model.path=123``).
    """
    data = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node, cls = data, RunConfig
        for depth, part in enumerate(path):
            hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
            where = "--set " + ".".join(path[: depth + 1])
            if dataclasses.is_dataclass(cls) and part not in hints:
                raise ConfigError(f"{where}: unknown key {part!r}; valid keys: {', '.join(sorted(hints))}")
            if depth == len(path) - 1:
                tp = hints.get(part)
                if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                 and str in typing.get_args(tp) and value is not None):
                    if not isinstance(value, str):
                        value = text.split("=", 1)[1]
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{where}: is not a section")
                cls = hints.get(part, dict) if dataclasses.is_dataclass(cls) else dict
    return data


def read_json_object(path: str, what: str) -> dict:
    """A JSON file whose top level is an object, or a one-line ConfigError naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def load_run_config(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    """Read the run-config JSON (or start from defaults when ``path`` is None), apply overrides, validate."""
    data = read_json_object(path, "run config") if path else {}
    data = apply_overrides(data, list(overrides))
    data = resolve_muse(data)
    cfg = from_dict(RunConfig, data, where=path or "config")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need no files and no process group."""
    t = cfg.train
    checks = [
        (t.lr > 0, "train.lr: expected > 0"),
        (t.schedule in SCHEDULES, f"train.schedule: expected one of {list(SCHEDULES)}, got {t.schedule!r}"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio: expected 0 <= x < 1"),
        (t.micro_batch_size >= 1, "train.micro_batch_size: expected >= 1"),
        (t.grad_accum >= 1, "train.grad_accum: expected >= 1"),
        (t.retain_ratio >= 1, "train.retain_ratio: expected >= 1"),
        (t.num_steps is None or t.num_steps >= 1, "train.num_steps: expected >= 1 or null"),
        (t.epochs > 0, "train.epochs: expected > 0"),
        (t.grad_clip >= 0, "train.grad_clip: expected >= 0"),
        (len(t.betas) == 2, "train.betas: expected two numbers"),
        (cfg.data.seq_len >= 2, "data.seq_len: expected >= 2"),
        (cfg.data.forget_per_batch >= 0, "data.forget_per_batch: expected >= 0 (0 = train corpus only)"),
        (cfg.data.retain_source in ("retain", "general"),
         f"data.retain_source: expected 'retain' or 'general', got {cfg.data.retain_source!r}"),
        (cfg.reference.mode in REFERENCE_MODES,
         f"reference.mode: expected one of {', '.join(REFERENCE_MODES)} or 'auto', got {cfg.reference.mode!r}"),
        (cfg.reference.path is None or cfg.reference.mode == "engine",
         "reference.path needs reference.mode='engine' (a cache and adapters_off both come from the trained model)"),
        (cfg.reference.mode != "adapters_off" or cfg.adapter.rank > 0,
         "reference.mode='adapters_off' needs an adapter (adapter.rank > 0)"),
        (cfg.adapter.rank >= 0, "adapter.rank: expected >= 0 (0 = no adapter)"),
        (cfg.adapter.alpha > 0, "adapter.alpha: expected > 0"),
        (0 <= cfg.adapter.dropout < 1, "adapter.dropout: expected 0 <= x < 1"),
        (cfg.model.init in ("pretrained", "random"),
         f"model.init: expected 'pretrained' or 'random', got {cfg.model.init!r}"),
        (cfg.reference.topk >= 1, "reference.topk: expected >= 1"),
        (cfg.eval.stop_target in ("original_approximate", "current_approximate", "retrained_forget"),
         "eval.stop_target: expected 'original_approximate', 'current_approximate' or 'retrained_forget', "
         f"got {cfg.eval.stop_target!r}"),
        (cfg.eval.stop_target != "retrained_forget" or cfg.eval.retrained_model,
         "eval.stop_target='retrained_forget' needs eval.retrained_model"),
        (not cfg.eval.base_model or cfg.eval.stop_target == "original_approximate",
         f"eval.base_model corrects the 'original_approximate' target; got eval.stop_target={cfg.eval.stop_target!r}"),
        (cfg.checkpoint.every_n_steps >= 0, "checkpoint.every_n_steps: expected >= 0"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last: expected >= 1"),
        (cfg.eval.every_n_steps >= 0, "eval.every_n_steps: expected >= 0"),
        (cfg.guard.max_consecutive_skips >= 1, "guard.max_consecutive_skips: expected >= 1"),
        (bool(cfg.output.run_dir), "output.run_dir: expected a directory path"),
    ]
    e, c = cfg.eval, cfg.cost
    rule_on = e.stop_tolerance > 0
    checks += [
        (set(e.splits) <= set(EVAL_SPLITS),
         f"eval.splits: expected names from {list(EVAL_SPLITS)}, got {list(e.splits)}"),
        (e.micro_batch_size >= 1, "eval.micro_batch_size: expected >= 1"),
        (e.max_chunks is None or e.max_chunks >= 1, "eval.max_chunks: expected >= 1 or null"),
        (e.stop_tolerance >= 0, "eval.stop_tolerance: expected >= 0"),
        (0 <= e.memorisation_prefix < cfg.data.seq_len, f"eval.memorisation_prefix: expected 0 <= prefix < "
         f"data.seq_len ({cfg.data.seq_len}), got {e.memorisation_prefix}"),
        (e.generation_prompts >= 0, f"eval.generation_prompts: expected >= 0 (0 = off), got {e.generation_prompts}"),
        (e.verbmem_tokens >= 1, f"eval.verbmem_tokens: expected >= 1, got {e.verbmem_tokens}"),
        (e.knowmem_tokens >= 1, f"eval.knowmem_tokens: expected >= 1, got {e.knowmem_tokens}"),
        (not e.generation_prompts or e.memorisation_prefix > 0, "eval.generation_prompts > 0 needs "
         "eval.memorisation_prefix > 0: the prefix is VerbMem's prompt"),
        (0 <= e.selection_fraction < 1, f"eval.selection_fraction: expected 0 <= fraction < 1, got "
                                        f"{e.selection_fraction}"),
        (not rule_on or e.every_n_steps > 0,
         "eval.stop_tolerance > 0 needs eval.every_n_steps > 0: the stop rule is checked at evaluations"),
        (e.auc_band is None or 0 < e.auc_band < 0.5, "eval.auc_band: expected 0 < band < 0.5 or null"),
        (e.utility_tolerance >= 0, "eval.utility_tolerance: expected >= 0"),
        (not rule_on or "forget" in e.splits, "eval.stop_tolerance: the stop rule needs 'forget' in eval.splits"),
        (set(e.audits) <= set(AUDITS), f"eval.audits: expected names from {list(AUDITS)}, got {list(e.audits)}"),
        (not e.audits or cfg.output.save_model,
         "eval.audits: the audits run on the exported model; set output.save_model=true"),
        (c.pretrain_tokens is None or c.pretrain_tokens > 0, "cost.pretrain_tokens: expected > 0 or null"),
        (c.known_model is None or c.known_model in KNOWN_PRETRAINING,
         f"cost.known_model: unknown {c.known_model!r}; known: {', '.join(sorted(KNOWN_PRETRAINING))}"),
    ]
    a = cfg.audit
    checks += [
        (a.relearn_steps >= 1, "audit.relearn_steps: expected >= 1"),
        (0 < a.relearn_fraction < 1, "audit.relearn_fraction: expected 0 < x < 1"),
        (a.relearn_lr is None or (all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                      for x in relearn_rates(a, 1.0)) and relearn_rates(a, 1.0)),
         f"audit.relearn_lr: expected a rate > 0, a non-empty list of them, or null; got {a.relearn_lr!r}"),
        (a.relearn_batch_size >= 1, "audit.relearn_batch_size: expected >= 1"),
        (0 < a.relearn_within <= 1, "audit.relearn_within: expected 0 < x <= 1"),
        (bool(a.relearn_data), "audit.relearn_data: expected \"forget\", \"retain\", \"general\" or a JSONL path"),
        (all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in a.quantize_bits),
         f"audit.quantize_bits: expected integers from 2 to 8, got {list(a.quantize_bits)}"),
        (isinstance(a.quantize_group_size, int) and not isinstance(a.quantize_group_size, bool)
         and a.quantize_group_size >= 2,
         f"audit.quantize_group_size: expected an integer >= 2 (torchao refuses a scale per weight), got "
         f"{a.quantize_group_size!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for key, weight in cfg.method.weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"method.weights.{key}: expected a number, got {json.dumps(weight)}")


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field with its default and docstring (``--help-config``)."""
    import ast
    import inspect
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    lines = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = json.dumps(to_dict(instance)[f.name]) if dataclasses.is_dataclass(instance) else ""
            lines.append(f"{prefix}{f.name} = {default}  -- {docs.get(f.name, '')}")
    return lines
