"""The method registry: registry key (= file name) -> the method's frozen dataclass.

Adding a method (see docs/architecture.md and docs/methods.md):
1. ``dsunlearn/methods/<key>.py``: a frozen dataclass subclassing ``base.Method``, its paper-default
   hyperparameters as fields (a docstring each, checked in ``__post_init__``), a module docstring with the citation and
   the formula, ``citation``, and ``terms(outputs)`` returning named losses built from ``terms.py``. Declare only what
   differs from ``Method``'s defaults (``streams``, ``reference``, ``precomputed``, ``default_weights``, ...).
2. One line in ``METHODS`` below.
3. A shipped example config ``dsunlearn/configs/<key>.json``.
4. A section ``## `<key>` `` in docs/methods.md (the registry test checks 2-4 exist).

The study's seven (Yao et al. 2024) are ga, random_labels, adversarial_labels, ga_gd and ga_kl; "in-distribution"
vs "general" retain data is the data knob ``data.retain_source`` ("retain" | "general"), not a separate method.
"""
from __future__ import annotations

import re

from ..config import ConfigError, MethodConfig, from_dict
from .adversarial_labels import AdversarialLabels
from .ga import GradientAscent
from .ga_gd import GradDiff
from .ga_kl import GradKL
from .negate_repair import NegateRepair
from .npo import NPO
from .random_labels import RandomLabels
from .rmu import RMU
from .simnpo import SimNPO
from .task_vector import TaskVector
from .token_rows import TokenRows
from .undo import UNDO

METHODS = {
    "ga": GradientAscent,
    "random_labels": RandomLabels,
    "adversarial_labels": AdversarialLabels,
    "ga_gd": GradDiff,
    "ga_kl": GradKL,
    "npo": NPO,
    "simnpo": SimNPO,
    "rmu": RMU,
    # Methods in phases (phased.py; the phase machinery: dsunlearn/phases.py).
    "token_rows": TokenRows,
    "task_vector": TaskVector,
    "negate_repair": NegateRepair,
    "undo": UNDO,
}


def build_method(cfg: MethodConfig):
    """Instantiate the configured method with its params checked against the method's dataclass."""
    if cfg.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.name!r}; valid: {', '.join(sorted(METHODS))}")
    cls = METHODS[cfg.name]
    method = from_dict(cls, cfg.params, where="method.params")
    # term_names may depend on the params (NPO's optional retain term), so check against the instance.
    unknown = sorted(set(cfg.weights) - set(method.term_names))
    if unknown:
        raise ConfigError(f"method.weights: unknown term(s) {', '.join(map(repr, unknown))} for {cfg.name!r}; "
                          f"its terms: {', '.join(method.term_names)}")
    return method


def term_weights(method, cfg: MethodConfig) -> dict[str, float]:
    """The run config's weight, else the method's paper default, else 1.0."""
    return {name: float(cfg.weights.get(name, method.default_weights.get(name, 1.0))) for name in method.term_names}


def check_method_on_model(method, model_config) -> None:
    """What a method can check against the model's config.json before any weights load (RMU: its layer exists)."""
    num_layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", None)
    if num_layers is not None:
        method.check_model(int(num_layers))


def select_trainable(model, method) -> list[str]:
    """Freeze every parameter that the method's ``trainable_params`` regex does not fully match.

    Must run before the engine is built: DeepSpeed and the optimizer only see parameters that require grad. Returns
    the names left trainable (all of them when the method has no pattern).
    """
    pattern = method.trainable_params
    names = [n for n, _ in model.named_parameters()]
    if pattern is None:
        return names
    regex = re.compile(pattern)
    keep = [n for n in names if regex.fullmatch(n)]
    if not keep:
        raise ConfigError(f"method.params.trainable_params: {pattern!r} matches no parameter of the model "
                          f"(e.g. {', '.join(names[:3])}, ...)")
    method.check_trainable(keep)
    selected = set(keep)
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)
    return keep
