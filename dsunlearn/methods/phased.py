"""Methods in phases: a method as a sequence of phases, each of one kind (docs/methods.md, "Methods in phases").

    train       named loss terms over streams, the one loop's micro-steps (every single-phase method is one phase)
    edit        a weight transform computed from statistics over the streams, no optimizer (the token-row edit,
                UNDO's noising)
    arithmetic  theta <- theta_base - beta (theta_moved - theta_base) between two phase boundaries (task-vector
                negation, Ilharco et al. 2023)
    distil      a train phase whose frozen reference is a teacher boundary (``TrainPhase.teacher``): KL from the
                teacher into the trained model (UNDO)

A phase's output is a *boundary*: a model directory, named by the phase. ``INPUT`` names the run's own model. The
last phase is the run's own training when it is a ``TrainPhase`` without ``num_steps``: it reads the ``train``
section, evaluates every ``eval.every_n_steps`` and exports the best evaluated step by the selection judgement. A
method whose phases end otherwise is evaluated once on the last boundary (``HOLD``).

Like every method this is single-device code: the phase machinery (``dsunlearn/phases.py``) runs each phase on every
rank, writes its boundary and resumes in any phase. The pure tensor functions below are what the edit and arithmetic
phases compute; the tests check them against hand computations.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch

from ..config import ConfigError
from .base import Method
from .terms import kl_to_reference, token_nll

INPUT = "input"
"""The boundary before the first phase: the run's model (``model.path``)."""


@dataclass(frozen=True)
class TrainPhase:
    """Optimizer steps on ``method``'s loss terms. ``num_steps=None``: the run's own training (the last phase only):
    the ``train`` section's knobs, evaluations and the exported step. Otherwise the phase's own knobs (the method's
    params own them); ``global_batch`` chunks per step over all ranks, so 2 ranks take the steps 1 rank takes.
    ``lr`` None: ``lr_ratio`` times ``train.lr`` (a rate that scales with the one the user sets for the model)."""
    name: str
    method: Method
    num_steps: Optional[int] = None
    lr: Optional[float] = 1e-3
    lr_ratio: float = 1.0
    global_batch: int = 16
    schedule: str = "constant"
    teacher: Optional[str] = None
    """A boundary whose weights are the frozen reference of ``method`` (distillation); None: theta_0 as usual."""
    keep_off: Optional[tuple] = None
    """``(a, b)``, two earlier boundaries (the run's own training only): after every optimizer step the weights lose
    their component along ``u = theta_a - theta_b``, measured from ``theta_b`` (``project_off``): the phase cannot
    move back along the direction from a to b. None: unconstrained."""
    kind: ClassVar[str] = "train"


@dataclass(frozen=True)
class EditContext:
    """What an edit reads besides the tensor: token counts per stream ([vocab] int64), the input embedding's
    parameter name, the model's initializer range and a seed. ``null_counts``: for an edit phase with
    ``null_draws``, one (sample, rest) pair of [vocab] counts per draw: retain documents drawn at random (seeded)
    until they hold as many tokens as the forget stream, and the other retain documents. ``base_embedding``: for an
    edit phase with ``base_rows``, the input embedding of ``eval.base_model`` (None without one). ``notes``: what the
    edit reports (written into the phase's ``phase.json``)."""
    token_counts: dict
    embedding: str
    init_std: float
    seed: int
    null_counts: tuple = ()
    base_embedding: Optional[torch.Tensor] = None
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EditPhase:
    """``edit(name, tensor, context)`` for every weight tensor of the input boundary: the new tensor, or None to keep
    it. ``statistics``: the streams whose token counts the context carries."""
    name: str
    edit: Callable[[str, torch.Tensor, EditContext], Optional[torch.Tensor]]
    statistics: tuple = ()
    null_draws: int = 0
    """Random retain samples the context carries (``EditContext.null_counts``); needs "forget" and "retain"."""
    base_rows: bool = False
    """The context carries the base model's input embedding (``EditContext.base_embedding``) when one is set."""
    kind: ClassVar[str] = "edit"


@dataclass(frozen=True)
class ArithmeticPhase:
    """theta <- theta_base - beta (theta_moved - theta_base), tensor by tensor, between two boundaries."""
    name: str
    base: str
    moved: str
    beta: float
    kind: ClassVar[str] = "arithmetic"


@dataclass(frozen=True, kw_only=True)
class Descent(Method):
    """Plain next-token descent on one stream: loss = NLL(stream)."""
    stream: str = "retain"
    citation: ClassVar = "causal language modelling"

    @property
    def streams(self):
        return (self.stream,)

    def stream_batch_size(self, stream: str, train) -> int:
        return train.micro_batch_size

    def terms(self, outputs):
        o = outputs[self.stream]
        return {self.stream: token_nll(o.logits, o.labels)}


@dataclass(frozen=True, kw_only=True)
class Distillation(Method):
    """KL(teacher || student) per next-token position on one stream; the teacher is the frozen reference."""
    stream: str = "retain"
    citation: ClassVar = "Hinton et al. 2015 (arXiv:1503.02531); as UNDO uses it, Lee et al. 2025"

    @property
    def streams(self):
        return (self.stream,)

    @property
    def reference(self):
        return {self.stream: "logits"}

    def stream_batch_size(self, stream: str, train) -> int:
        return train.micro_batch_size

    def terms(self, outputs):
        o = outputs[self.stream]
        ref = o.reference
        return {self.stream: kl_to_reference(o.logits, o.labels, ref.topk_logprobs, ref.topk_ids, ref.rest_logmass)}


@dataclass(frozen=True, kw_only=True)
class Hold(Method):
    """The last phase of a method that ends in an edit or arithmetic: no step, the boundary is evaluated once."""
    citation: ClassVar = ""

    @property
    def streams(self):
        return ()

    def terms(self, outputs):
        return {}


HOLD = TrainPhase("result", Hold(), num_steps=0)


@dataclass(frozen=True, kw_only=True)
class PhasedMethod(Method):
    """A method that is a sequence of phases (``phases()``). The run's ``train`` section, weights and evaluations
    belong to the last phase when it is the run's own training (``TrainPhase`` without ``num_steps``)."""

    def phases(self) -> tuple:
        raise NotImplementedError

    def final_phase(self) -> TrainPhase:
        last = self.phases()[-1]
        return last if isinstance(last, TrainPhase) and last.num_steps is None else HOLD

    def earlier_phases(self) -> tuple:
        """Every phase before the run's own training (all of them when the method ends in an edit)."""
        phases = self.phases()
        return phases[:-1] if self.final_phase() == phases[-1] else phases

    @property
    def streams(self):
        names: list[str] = []
        for ph in self.phases():
            more = ph.method.streams if isinstance(ph, TrainPhase) else getattr(ph, "statistics", ())
            names += [n for n in more if n not in names]
        return tuple(names)

    @property
    def term_names(self):
        return self.final_phase().method.term_names

    @property
    def default_weights(self):
        return self.final_phase().method.default_weights

    def terms(self, outputs):  # the loop runs each phase's own method
        raise NotImplementedError("a phased method's terms are its phases' (dsunlearn/phases.py)")


def phase_lr(ph: TrainPhase, train_lr: float) -> float:
    """A train phase's learning rate: its own, or ``lr_ratio`` times the run's ``train.lr``."""
    return ph.lr if ph.lr is not None else ph.lr_ratio * train_lr


def check_phase_knob(name: str, value, low=0, integer: bool = False) -> None:
    if integer and (not isinstance(value, int) or value < low) or not integer and not value > low:
        raise ConfigError(f"method.params.{name}: expected {'an integer >= ' if integer else '> '}{low}, got {value!r}")


# ---- the tensor math of the edit and arithmetic phases ----

def forget_token_ratio(forget_counts: torch.Tensor, retain_counts: torch.Tensor) -> torch.Tensor:
    """Per token: its rate in the forget text over its rate in the retain text, the retain count smoothed by +1 (a
    token never seen in retain text has a finite ratio that grows with its forget count).

        ratio_t = (c_f[t] / sum c_f) / ((c_r[t] + 1) / sum c_r)
    """
    cf, cr = forget_counts.double(), retain_counts.double()
    return (cf / cf.sum().clamp_min(1)) / ((cr + 1) / cr.sum().clamp_min(1))


def forget_specific_tokens(forget_counts: torch.Tensor, retain_counts: torch.Tensor,
                           threshold: float) -> torch.Tensor:
    """The tokens the forget text uses at least ``threshold`` times as often as the retain text (and at least once)."""
    return (forget_token_ratio(forget_counts, retain_counts) >= threshold) & (forget_counts > 0)


def mean_rows(embedding: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The embedding with ``rows`` (a [vocab] bool mask) set to the mean of the other rows."""
    out = embedding.clone()
    if bool(rows.any()) and not bool(rows.all()):
        out[rows] = embedding[~rows].double().mean(0).to(embedding.dtype)
    return out


def negate(base: torch.Tensor, moved: torch.Tensor, beta: float) -> torch.Tensor:
    """Task-vector negation: base - beta (moved - base), in fp32 at least."""
    dtype = torch.promote_types(base.dtype, torch.float32)
    return (base.to(dtype) - beta * (moved.to(dtype) - base.to(dtype))).to(base.dtype)


def project_off(theta: dict, origin: dict, direction: dict) -> dict:
    """The weights without their component along one direction of the whole weight space, measured from ``origin``
    (every tensor together: one direction, not one per tensor).

        theta <- theta - c u,    c = <theta - origin, u> / <u, u>     (sums over every tensor; c = 0 when u = 0)

    What ``TrainPhase.keep_off`` applies after every optimizer step (``dsunlearn/keep_off.py``, on each rank's
    partitions); this is the single-device reference the tests check it against."""
    dot = sum(float(((theta[k].double() - origin[k].double()) * direction[k].double()).sum()) for k in theta)
    norm_sq = sum(float((direction[k].double() ** 2).sum()) for k in theta)
    c = dot / norm_sq if norm_sq > 0 else 0.0
    return {k: (theta[k].double() - c * direction[k].double()).to(theta[k].dtype) for k in theta}


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: the same noise for a tensor whatever the rank, shard or order it is edited in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def noised(name: str, tensor: torch.Tensor, alpha: float, beta: float, init_std: float, seed: int) -> torch.Tensor:
    """UNDO's perturbation: (1 - alpha) theta + alpha beta N, N a fresh initialisation of the tensor: N(0, init_std)
    for matrices, ones for normalisation weights, zeros for biases (what Hugging Face models initialise them to)."""
    if tensor.dim() >= 2:
        g = torch.Generator().manual_seed(tensor_seed(seed, name))
        fresh = torch.randn(tensor.shape, generator=g, dtype=torch.float32) * init_std
    elif "norm" in name and name.endswith("weight"):
        fresh = torch.ones(tensor.shape)
    else:
        fresh = torch.zeros(tensor.shape)
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    return ((1 - alpha) * tensor.to(dtype) + alpha * beta * fresh.to(dtype)).to(tensor.dtype)

