"""RMU: representation misdirection, forget activations steered to a random direction, retain ones kept.

At one layer, forget activations are pushed toward a fixed random vector and retain activations held where theta_0
had them.

Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning", ICML 2024 (arXiv:2403.03218).

    loss = MSE(h_l(forget), c * u)  +  alpha * MSE(h_l(retain), h_l^theta0(retain))

h_l is the output of decoder layer ``layer`` (``hidden_states[layer + 1]`` of the forward's outputs, never read from
inside modules). For the LAST decoder layer transformers (5.x) returns the final norm's output there instead
(``hidden_states[-1]`` is tied to ``last_hidden_state``): steering the last layer steers the normalised state, and
``steering_coeff`` must be sized for it (tests/unit/test_methods.py checks this convention). u is a fixed random unit
vector (uniform [0, 1) entries, normalised, seeded by ``control_seed``).

Only the parameters ``trainable_params`` matches are trained. By default these are the MLP output projections of layers
l-2..l, as in the released code (layer 7, param_ids [6] of layers 5-7 = ``mlp.down_proj``). A set containing a
parameter that cannot reach h_l (a later layer, the final norm, the LM head) is refused: its gradient would always be
zero, and a run that trains nothing would say nothing about it.

Defaults are the paper's Zephyr-7B setting, as the released code's command for it sets them (its argparse defaults
differ: c = 20, alpha = 100): l = 7, c = 6.5, alpha = 1200 (the retain weight), lr 5e-5, 150 batches of 4. c should
scale with the norm of layer l's activations: retune it for other models. The released code averages the squared
error over padding too; here padding is masked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..config import ConfigError
from .base import Method
from .terms import activation_mse


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_INPUT_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe|embed_positions)\.")


@dataclass(frozen=True, kw_only=True)
class RMU(Method):
    layer: int = 7
    """Decoder layer whose output is steered (0-based; the paper's layer_id)."""
    steering_coeff: float = 6.5
    """c: the norm of the forget activations' target (paper, Zephyr-7B: 6.5)."""
    trainable_params: Optional[str] = None
    """Regex (full match on parameter names): the only parameters that train, applied before the engine is built.
    Default: the MLP output projections of layers ``layer``-2..``layer`` (Llama/Mistral/Qwen ``mlp.down_proj``,
    GPT-2 ``mlp.c_proj``, GPT-NeoX ``mlp.dense_4h_to_h``)."""
    control_seed: int = 0
    """Seed of the random direction u."""

    streams: ClassVar = ("forget", "retain")
    reference: ClassVar = {"retain": "hidden"}
    default_weights: ClassVar = {"retain": 1200.0}
    needs_hidden_states: ClassVar = True
    citation: ClassVar = "Li et al. 2024 (arXiv:2403.03218)"

    def __post_init__(self):
        if self.layer < 0:
            raise ConfigError("method.params.layer: expected >= 0")
        if self.trainable_params is None:
            layers = "|".join(str(i) for i in range(max(0, self.layer - 2), self.layer + 1))
            object.__setattr__(self, "trainable_params", rf"(?:.*\.)?(?:layers|h)\.({layers})\.mlp\."
                                                         rf"(?:down_proj|c_proj|dense_4h_to_h)\.weight")

    def check_model(self, num_layers: int) -> None:
        """Refuse a layer the model does not have (called before any weights are loaded)."""
        if self.layer >= num_layers:
            raise ConfigError(f"method.params.layer={self.layer}: the model has {num_layers} decoder layers "
                              f"(0..{num_layers - 1})")

    def check_trainable(self, names: list[str]) -> None:
        """Every trainable parameter must be able to change h_l: inside a decoder layer <= ``layer``, or an input
        embedding. The decoder-layer index is read from the name (``...layers.<i>.`` / GPT-2's ``...h.<i>.``)."""
        for name in names:
            found = _LAYER_INDEX.search(name)
            if found is None:
                ok = bool(_INPUT_EMBEDDING.search(name))
            else:
                ok = int(found.group(1)) <= self.layer
            if not ok:
                raise ConfigError(f"method.params.trainable_params: {name} cannot affect the output of layer "
                                  f"{self.layer} (method.params.layer), so its gradient is always zero; train only "
                                  f"parameters of layers <= {self.layer}")

    @property
    def hidden_index(self) -> int:
        return self.layer + 1  # hidden_states[0] is the embedding output

    def control_vector(self, hidden_size: int) -> torch.Tensor:
        """c * u: the same vector on every rank and step (a seeded CPU generator, independent of global RNG state)."""
        u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(self.control_seed), dtype=torch.float64)
        return (self.steering_coeff * u / u.norm()).float()

    def terms(self, outputs):
        forget, retain = outputs["forget"], outputs["retain"]
        self.check_model(len(forget.hidden_states) - 1)
        h_forget = forget.hidden_states[self.hidden_index]
        target = self.control_vector(h_forget.size(-1)).to(h_forget.device)
        return {"forget": activation_mse(h_forget, target, forget.labels),
                "retain": activation_mse(retain.hidden_states[self.hidden_index], retain.reference.hidden,
                                         retain.labels)}
