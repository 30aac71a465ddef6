"""UNDO: unlearn, noise, distil.

Lee, Bhatt, Chan, Cheng, Kokotajlo, Krueger, Lubana, "Distillation Robustifies Unlearning", 2025 (arXiv:2506.06278).

    1. unlearn  ``unlearn_steps`` of a registered method (``unlearn_method``, its paper defaults): the teacher
    2. noise    theta <- (1 - alpha) theta_teacher + alpha beta N,  N a fresh initialisation (``phased.noised``)
    3. distil   the run's own training: KL(teacher || theta) per position on the retain stream, the teacher a frozen
                ZeRO-3 engine (``reference.mode`` "engine"); evaluated and exported like any run

The paper's finding: what an unlearned model only suppresses comes back under fine-tuning; a student distilled from
its outputs after the weights were damaged never had it, so it does not relearn faster than a model that never saw
the data. The price is the distillation's compute, which the cost shows. The paper sweeps alpha in [0.1, 0.8] with
beta 0.1-1; the default here is its middle (alpha 0.5, beta 1: halfway to a fresh initialisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import ConfigError
from .phased import Distillation, EditPhase, PhasedMethod, TrainPhase, check_phase_knob, noised


@dataclass(frozen=True, kw_only=True)
class UNDO(PhasedMethod):
    unlearn_method: str = "simnpo"
    """Phase 1: the registered single-phase method whose result is the teacher (its paper defaults)."""
    unlearn_steps: int = 30
    """Phase 1: its AdamW steps."""
    unlearn_lr: float = 3e-4
    """Phase 1: its constant learning rate."""
    unlearn_batch: int = 8
    """Phase 1: forget chunks per step over all ranks (as many retain chunks where the method has a retain term)."""
    alpha: float = 0.5
    """Phase 2: how far toward a fresh initialisation: (1 - alpha) theta + alpha beta N."""
    noise_beta: float = 1.0
    """Phase 2: the scale of the fresh initialisation N."""

    citation: ClassVar = "Lee et al. 2025 (arXiv:2506.06278)"

    def __post_init__(self):
        check_phase_knob("unlearn_steps", self.unlearn_steps, low=1, integer=True)
        check_phase_knob("unlearn_batch", self.unlearn_batch, low=1, integer=True)
        check_phase_knob("unlearn_lr", self.unlearn_lr)
        check_phase_knob("noise_beta", self.noise_beta)
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"method.params.alpha: expected in [0, 1], got {self.alpha}")
        from . import METHODS
        from .phased import PhasedMethod as _Phased
        if self.unlearn_method not in METHODS or issubclass(METHODS[self.unlearn_method], _Phased):
            single = sorted(k for k, v in METHODS.items() if not issubclass(v, _Phased))
            raise ConfigError(f"method.params.unlearn_method: expected one of {', '.join(single)}, got "
                              f"{self.unlearn_method!r}")

    def phases(self):
        from . import METHODS
        teacher = METHODS[self.unlearn_method]()
        return (TrainPhase("unlearn", teacher, num_steps=self.unlearn_steps, lr=self.unlearn_lr,
                           global_batch=self.unlearn_batch),
                EditPhase("noise", self.edit),
                TrainPhase("distil", Distillation(stream="retain"), teacher="unlearn"))

    def edit(self, name, tensor, ctx):
        return noised(name, tensor, self.alpha, self.noise_beta, ctx.init_std, ctx.seed)
