"""RMU: representation misdirection, forget activations steered to a random direction, retain ones kept.

At one layer, forget activations are pushed toward a fixed random vector and retain activations held where theta_0
had them.

Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning", ICML 2024 (arXiv:2403.03218).

    loss = MSE(h_l(forget), c * u)  +  alpha * MSE(h_l(retain), h_l^theta0(retain))

h_l is the output of decoder layer ``layer`` (``hidden_states[layer + 1]`` of the forward's outputs, never read from
inside modules); u is a fixed random unit vector (uniform [0, 1) entries, normalised, seeded by ``control_seed``).
Only parameters matching ``trainable_params`` are trained (paper: the MLP output projections of layers l-2..l).
Defaults are the paper's Zephyr-7B setting, as the released code's command for it sets them (its argparse defaults
differ: c = 20, alpha = 100): l = 7, c = 6.5, alpha = 1200 (the retain weight), lr 5e-5, 150 batches of 4. c should
scale with the norm of layer l's activations: retune it for other models. The released code averages the squared
error over padding too; here padding is masked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ConfigError
from .terms import activation_mse


@dataclass(frozen=True, kw_only=True)
class RMU:
    layer: int = 7
    """Decoder layer whose output is steered (0-based; the paper's layer_id)."""
    steering_coeff: float = 6.5
    """c: the norm of the forget activations' target (paper, Zephyr-7B: 6.5)."""
    trainable_params: str = r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight"
    """Regex (full match on parameter names): the only parameters that train. Applied before the engine is built."""
    control_seed: int = 0
    """Seed of the random direction u."""

    streams: ClassVar = ("forget", "retain")
    term_names: ClassVar = ("forget", "retain")
    reference: ClassVar = {"retain": "hidden"}
    default_weights: ClassVar = {"retain": 1200.0}
    needs_hidden_states: ClassVar = True
    citation: ClassVar = "Li et al. 2024 (arXiv:2403.03218)"

    def __post_init__(self):
        if self.layer < 0:
            raise ConfigError("method.params.layer: expected >= 0")

    @property
    def hidden_index(self) -> int:
        return self.layer + 1  # hidden_states[0] is the embedding output

    def control_vector(self, hidden_size: int) -> torch.Tensor:
        """c * u: the same vector on every rank and step (a seeded CPU generator, independent of global RNG state)."""
        u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(self.control_seed), dtype=torch.float64)
        return (self.steering_coeff * u / u.norm()).float()

    def terms(self, outputs):
        forget, retain = outputs["forget"], outputs["retain"]
        if self.hidden_index >= len(forget.hidden_states):
            raise ConfigError(f"method.params.layer={self.layer}: the model has {len(forget.hidden_states) - 1} "
                              f"decoder layers")
        h_forget = forget.hidden_states[self.hidden_index]
        target = self.control_vector(h_forget.size(-1)).to(h_forget.device)
        return {"forget": activation_mse(h_forget, target, forget.labels),
                "retain": activation_mse(retain.hidden_states[self.hidden_index], retain.reference.hidden,
                                         retain.labels)}
