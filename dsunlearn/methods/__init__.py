"""The method registry: registry key (= file name) -> the method's frozen dataclass.

Adding a method: one file with a frozen dataclass (paper defaults as fields, ``terms`` returning named losses) and
one line here. See docs/methods.md.
"""
from __future__ import annotations

from ..config import ConfigError, MethodConfig, from_dict
from .ga import GradientAscent
from .ga_gd import GradDiff

METHODS = {
    "ga": GradientAscent,
    "ga_gd": GradDiff,
}


def build_method(cfg: MethodConfig):
    """Instantiate the configured method with its params checked against the method's dataclass."""
    if cfg.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.name!r}; valid: {', '.join(sorted(METHODS))}")
    cls = METHODS[cfg.name]
    method = from_dict(cls, cfg.params, where="method.params")
    unknown = sorted(set(cfg.weights) - set(cls.term_names))
    if unknown:
        raise ConfigError(f"method.weights: unknown term(s) {', '.join(map(repr, unknown))} for {cfg.name!r}; "
                          f"its terms: {', '.join(cls.term_names)}")
    return method


def term_weights(method, cfg: MethodConfig) -> dict[str, float]:
    return {name: float(cfg.weights.get(name, 1.0)) for name in method.term_names}
