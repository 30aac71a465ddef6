"""Keep a train phase's updates off one direction of the weight space (``TrainPhase.keep_off``), on the engine.

After every optimizer step of the run's own training::

    theta <- theta - c u,    c = <theta - theta_b, u> / <u, u>,    u = theta_a - theta_b

with ``theta_a`` and ``theta_b`` two boundaries of the run (``methods/phased.project_off`` is the single-device
formula the tests check this against). ``negate_repair`` keeps its repair off the negation: a = the rows boundary,
b = the negated one, so u is beta times the forget task vector and the repair cannot climb back along it (it
repairs what the retain text needs in every other direction; docs/methods.md).

Where the weights live (DeepSpeed 0.19.8):
- ZeRO-3: each rank holds one partition of every parameter, the optimizer's fp32 master partition and the module's
  own (``ds_tensor``, the weights the next forward gathers); rank r's is the flattened tensor's elements
  ``[r n, (r + 1) n)``, zero-padded at the end (n = ``ds_tensor.numel()``). Both are rewritten; the two sums over
  the whole weight space are one float64 all-reduce.
- ZeRO-0/1/2: every rank holds the whole parameter and the same update; the fp32 master (``_hp_mapping``, when
  there is one) and the module's weights are both rewritten, no communication.
The two boundaries' partitions stay in memory in fp32 on the masters' device (two fp32 copies of this rank's share
of the weights). Each step costs a few elementwise passes: no forward, counted as 0 FLOPs, like an edit phase.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import engine as E


def local_part(full: torch.Tensor, numel: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 partition of ``full``: flattened elements ``[rank numel, (rank + 1) numel)``, the
    rest zeros."""
    flat = full.reshape(-1).float()
    part = torch.zeros(numel, dtype=torch.float32)
    piece = flat[rank * numel:(rank + 1) * numel]
    part[:piece.numel()] = piece
    return part


class KeepOff:
    """``TrainPhase.keep_off`` on a built engine: ``origin_dir`` is boundary b, ``toward_dir`` boundary a."""

    def __init__(self, engine, toward_dir: str, origin_dir: str, check_start: bool):
        from .phases import Tensors
        toward, origin = Tensors(Path(toward_dir)), Tensors(Path(origin_dir))
        self.params = [(n, q) for n, q in engine.module.named_parameters() if q.requires_grad]
        self.zero3 = bool(self.params) and hasattr(self.params[0][1], "ds_id")
        self.origin, self.direction = [], []
        norm_sq = torch.zeros((), dtype=torch.float64)
        for name, q in self.params:
            master = self.read(q)
            a, b = toward[name], origin[name]
            if self.zero3:
                a, b = local_part(a, q.ds_tensor.numel(), E.rank()), local_part(b, q.ds_tensor.numel(), E.rank())
            b = b.reshape(master.shape).to(device=master.device, dtype=torch.float32)
            u = a.reshape(master.shape).to(device=master.device, dtype=torch.float32) - b
            if check_start and not torch.allclose(master.float(), b, rtol=1e-3, atol=1e-3):
                # A fresh run starts from boundary b: anything else is a layout this module does not know.
                raise RuntimeError(f"keep_off: the engine's {name} does not hold the boundary {origin_dir} it was "
                                   f"loaded from (partition layout changed?)")
            self.origin.append(b)
            self.direction.append(u)
            norm_sq += (u.double() ** 2).sum().cpu()
        self.norm_sq = float(E.all_reduce_sum(norm_sq.reshape(1))[0]) if self.zero3 else float(norm_sq)

    def read(self, q) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param
        if hasattr(q, "ds_id"):
            return safe_get_local_fp32_param(q)
        full = safe_get_full_fp32_param(q) if hasattr(q, "_hp_mapping") else None
        return full if full is not None else q.data.float()

    def write(self, q, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param
        if hasattr(q, "ds_id"):
            safe_set_local_fp32_param(q, value)
            q.ds_tensor.data.copy_(value.reshape(q.ds_tensor.shape).to(q.ds_tensor.dtype))
            return
        if hasattr(q, "_hp_mapping"):
            safe_set_full_fp32_param(q, value)
        q.data.copy_(value.reshape(q.shape).to(q.dtype))

    @torch.no_grad()
    def __call__(self) -> float:
        """Project the current weights; returns c (the component removed, in units of u)."""
        if self.norm_sq == 0:
            return 0.0
        masters = [self.read(q) for _, q in self.params]
        dot = torch.zeros(1, dtype=torch.float64)
        for m, b, u in zip(masters, self.origin, self.direction):
            dot += ((m.double() - b.double()) * u.double()).sum().cpu()
        if self.zero3:
            dot = E.all_reduce_sum(dot)
        c = float(dot[0]) / self.norm_sq
        for (_, q), m, u in zip(self.params, masters, self.direction):
            self.write(q, (m.double() - c * u.double()).float())
        return c


def keep_off_hook(method, boundaries: dict, engine, resumed: bool):
    """The run's ``after_step`` for a phased method whose last phase keeps off a direction, else None. A fresh run
    (not ``resumed``) checks that the engine holds boundary b."""
    final = method.final_phase() if hasattr(method, "final_phase") else None
    if final is None or final.keep_off is None:
        return None
    toward, origin = final.keep_off
    return KeepOff(engine, boundaries[toward], boundaries[origin], check_start=not resumed)
