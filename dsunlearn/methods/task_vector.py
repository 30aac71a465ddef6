"""Task-vector negation: fine-tune a copy on the forget set, then move the model away from it.

Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, "Editing Models with Task Arithmetic", ICLR 2023
(arXiv:2212.04089); MUSE's "Task Vector" baseline (Shi et al. 2024, arXiv:2407.06460).

    theta_f = theta_0 after ``fit_steps`` AdamW steps of NLL(forget)      (phase "fit")
    theta   = theta_0 - beta (theta_f - theta_0)                          (phase "negate")

The fine-tune reinforces what the model knows of the forget set; its difference is the forget set's direction.
Defaults are the twin probe's (5 steps at lr 1e-3, 16 chunks a step, beta 2; docs/tuning.md): the paper picks its
scale on held-out data, here docs/methods.md gives the rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from .phased import INPUT, ArithmeticPhase, Descent, PhasedMethod, TrainPhase, check_phase_knob


FIT_LR_RATIO = 10 / 3
"""``fit_lr`` None: the fine-tune runs at this multiple of ``train.lr`` (the probe's 1e-3 against its repair's 3e-4).
With ``train.lr`` a tenth of the peak rate the model was last trained at, the fit runs at a third of that peak
(docs/methods.md, "How the hyperparameters are set")."""


def vector_phases(m, start: str = INPUT) -> tuple:
    """The fine-tune on the forget set from ``start``, and the negation of its task vector about ``start``."""
    return (TrainPhase("fit", Descent(stream="forget"), num_steps=m.fit_steps, lr=m.fit_lr, lr_ratio=FIT_LR_RATIO,
                       global_batch=m.fit_batch),
            ArithmeticPhase("negate", base=start, moved="fit", beta=m.beta))


def check_vector_knobs(m) -> None:
    check_phase_knob("fit_steps", m.fit_steps, low=1, integer=True)
    check_phase_knob("fit_batch", m.fit_batch, low=1, integer=True)
    if m.fit_lr is not None:
        check_phase_knob("fit_lr", m.fit_lr)
    check_phase_knob("beta", m.beta)


@dataclass(frozen=True, kw_only=True)
class TaskVector(PhasedMethod):
    fit_steps: int = 5
    """AdamW steps of the fine-tune on the forget set."""
    fit_lr: Optional[float] = 1e-3
    """Its constant learning rate; None: ``FIT_LR_RATIO`` x ``train.lr``."""
    fit_batch: int = 16
    """Forget chunks per fine-tune step, over all ranks (a multiple of the world size)."""
    beta: float = 2.0
    """The negation's scale: theta_0 - beta (theta_f - theta_0)."""

    citation: ClassVar = "Ilharco et al. 2023 (arXiv:2212.04089)"

    def __post_init__(self):
        check_vector_knobs(self)

    def phases(self):
        return vector_phases(self)
