"""Token rows, negation, repair: the twin probe's recipe (docs/tuning.md "Toward the twin") as one method.

    1. rows     the forget-specific token rows set to the mean row (``token_rows``)
    2. fit      ``fit_steps`` AdamW steps of NLL(forget) from the edited model          (``task_vector``)
    3. negate   theta <- theta_1 - beta (theta_2 - theta_1)
    4. repair   the run's own training: NLL(retain) under the ``train`` section; evaluated every
                ``eval.every_n_steps``, the best evaluated step by the selection judgement is exported

The negation overshoots (the forget set and much else become unlikely); the repair descends on retain text only, so
what comes back is what the retain text teaches and the forget set's own memories stay out. The probe found it within
0-4% of the twin on three pairs and the only model that passed the relearning audit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ..config import ConfigError
from .phased import Descent, PhasedMethod, TrainPhase
from .task_vector import check_vector_knobs, vector_phases
from .token_rows import check_rows_knobs, edit_token_rows, rows_phase


@dataclass(frozen=True, kw_only=True)
class NegateRepair(PhasedMethod):
    token_threshold: float = 3.0
    """Phase 1: the forget/retain per-token rate ratio from which a token's row is edited (``token_rows``)."""
    fit_steps: int = 5
    """Phase 2: AdamW steps of NLL(forget)."""
    fit_lr: Optional[float] = None
    """Phase 2: its constant learning rate; None: 10/3 x ``train.lr`` (``task_vector.FIT_LR_RATIO``), so the fit
    scales with the repair's rate, which the user sets for the model."""
    fit_batch: int = 16
    """Phase 2: forget chunks per step over all ranks."""
    beta: float = 2.0
    """Phase 3: the negation's scale."""
    keep_off_negation: bool = True
    """Phase 4: the repair's weights are kept off the direction the negation moved them (``TrainPhase.keep_off``
    from the rows boundary to the negated one): after every step their component along it is removed, so the
    repair restores what the retain text needs in every other direction but cannot climb back along the forget
    task vector."""

    citation: ClassVar = "dsunlearn (docs/tuning.md); task arithmetic: Ilharco et al. 2023 (arXiv:2212.04089)"

    def __post_init__(self):
        check_rows_knobs(self.token_threshold)
        check_vector_knobs(self)
        if not isinstance(self.keep_off_negation, bool):
            raise ConfigError(f"method.params.keep_off_negation: expected true or false, got {self.keep_off_negation!r}")

    def phases(self):
        return (rows_phase(self), *vector_phases(self, start="rows"),
                TrainPhase("repair", Descent(stream="retain"),
                           keep_off=("rows", "negate") if self.keep_off_negation else None))

    def edit(self, name, tensor, ctx):
        return edit_token_rows(name, tensor, ctx, self.token_threshold)
