"""Forget-specific token-row edit: the input-embedding rows of the tokens that the forget text uses far more often
than the retain text go back to where they were before the forget set was learnt (docs/methods.md; found by the twin
probe, docs/tuning.md "Toward the twin").

    S = {t : c_f[t] > 0  and  ratio_t >= tau},     ratio_t = (c_f[t] / sum c_f) / ((c_r[t] + 1) / sum c_r)
    E[t] <- B[t]                                     for every t in S, with a base model B (``eval.base_model``)
    E[t] <- mean_{u not in S} E[u]                   for every t in S, without one

c_f, c_r: token counts of the forget and the retain text. A model trained on a forget set full of rare tokens (names,
identifiers, a book's vocabulary) keeps much of what it memorised in those tokens' rows; the twin never trained
them on that text. A model trained from scratch had nothing in them before: the mean row stands in for that. A model
continued from a pretrained one had what it learnt everywhere else: the base model's rows are that, and the mean row
would erase it (docs/tuning.md, "On a real pretrained model"). tau is a fixed rule, not fitted to a pair: a token is
forget-specific when the forget text uses it at least 3 times as often per token as the retain text. The phase also
records the selection against a null (random retain documents of the forget set's size; ``null_lift``), a
diagnostic: no threshold on it is a rule (docs/methods.md). No optimizer, no forward: a statistics pass over the
token ids and one tensor edited.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ConfigError
from .phased import EditPhase, PhasedMethod, forget_specific_tokens, mean_rows

NULL_DRAWS = 5
"""Random retain samples the null draws (``EditPhase.null_draws``)."""


def covered_share(sample: torch.Tensor, rest: torch.Tensor, token_threshold: float) -> float:
    """The share of ``sample``'s tokens that the rule selects against ``rest``."""
    rows = forget_specific_tokens(sample, rest, token_threshold)
    return float(sample[rows].sum()) / max(1, int(sample.sum()))


def null_lift(ctx, token_threshold: float) -> dict:
    """The selection against its null: the share of the forget tokens the selected rows cover, over the mean share
    that the same rule selects when random retain text of the forget set's size stands in for the forget set.

        lift = share(forget vs retain) / mean_d share(sample_d vs rest_d)

    A draw is a fair stand-in only when the rest of the retain set is at least as large as the sample (the forget
    set is measured against the whole retain set); with a retain set under twice the forget set's tokens the null
    is not measured (``null_token_share`` and ``lift`` None, and why). ``lift`` is None too when the null selects
    nothing (no ratio to give).
    """
    forget = covered_share(ctx.token_counts["forget"], ctx.token_counts["retain"], token_threshold)
    fair = [(a, b) for a, b in ctx.null_counts if int(b.sum()) >= int(a.sum())]
    out = {"forget_token_share": round(forget, 4), "null_draws": len(fair)}
    if not fair:
        return dict(out, null_token_share=None, lift=None,
                    null="not measured: the retain set holds fewer than twice the forget set's tokens")
    null = sum(covered_share(a, b, token_threshold) for a, b in fair) / len(fair)
    return dict(out, null_token_share=round(null, 4), lift=round(forget / null, 3) if null > 0 else None)


def edit_token_rows(name, tensor, ctx, token_threshold: float):
    """The edit phase's function: the input embedding's forget-specific rows to the base model's rows
    (``ctx.base_embedding``) or, without one, to the mean row; nothing else. The notes record the selection, its
    null and where the rows went."""
    if name != ctx.embedding:
        return None
    rows = forget_specific_tokens(ctx.token_counts["forget"], ctx.token_counts["retain"], token_threshold)
    rows = rows[:tensor.shape[0]]  # a padded embedding table has rows no token reaches
    ctx.notes.update(rows_selected=int(rows.sum()), **(null_lift(ctx, token_threshold) if ctx.null_counts else {}))
    if ctx.base_embedding is None:
        ctx.notes["rows_to"] = "mean row"
        return mean_rows(tensor, rows)
    base = ctx.base_embedding
    if tuple(base.shape) != tuple(tensor.shape):
        raise ConfigError(f"eval.base_model: its input embedding is {tuple(base.shape)}, the model's "
                          f"{tuple(tensor.shape)}; the base must be the model this one was trained from")
    ctx.notes["rows_to"] = "base model"
    out = tensor.clone()
    out[rows] = base[rows].to(tensor.dtype)
    return out


def check_rows_knobs(token_threshold: float) -> None:
    if not token_threshold > 1:
        raise ConfigError(f"method.params.token_threshold: expected > 1 (a token used more often in the forget text "
                          f"than in the retain text), got {token_threshold}")


@dataclass(frozen=True, kw_only=True)
class TokenRows(PhasedMethod):
    token_threshold: float = 3.0
    """tau: the forget/retain per-token rate ratio from which a token counts as forget-specific."""

    citation: ClassVar = ("dsunlearn (docs/tuning.md, the twin probe); the generic-token idea of Eldan and "
                          "Russinovich 2023 (arXiv:2310.02238)")

    def __post_init__(self):
        check_rows_knobs(self.token_threshold)

    def phases(self):
        return (rows_phase(self),)

    def edit(self, name, tensor, ctx):
        return edit_token_rows(name, tensor, ctx, self.token_threshold)


def rows_phase(m) -> EditPhase:
    """The edit phase of ``m`` (a method with ``edit``): token counts, the null's draws, the base's rows."""
    return EditPhase("rows", m.edit, statistics=("forget", "retain"), null_draws=NULL_DRAWS, base_rows=True)
