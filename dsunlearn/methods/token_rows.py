"""Forget-specific token-row edit: the input-embedding rows of the tokens that the forget text uses far more often
than the retain text are set to the mean row (docs/methods.md; found by the twin probe, docs/tuning.md "Toward the
twin").

    S = {t : c_f[t] > 0  and  ratio_t >= tau},     ratio_t = (c_f[t] / sum c_f) / ((c_r[t] + 1) / sum c_r)
    E[t] <- mean_{u not in S} E[u]                   for every t in S

c_f, c_r: token counts of the forget and the retain text. A model trained on a forget set full of rare tokens (names,
identifiers, a book's vocabulary) keeps much of what it memorised in those tokens' rows; the twin never trained
them, so they sit where initialisation and the shared directions put them. tau is a fixed rule, not fitted to a
pair: a token is forget-specific when the forget text uses it at least 3 times as often per token as the retain text
(docs/methods.md gives what it selects and why no statistical null sets it). No optimizer, no forward: a statistics
pass over the token ids and one tensor edited.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ConfigError
from .phased import EditPhase, PhasedMethod, forget_specific_tokens, mean_rows

log = logging.getLogger(__name__)

MIN_NULL_LIFT = 2.0
"""The default null check: the selection must cover at least twice what random retain text of the same size gives,
i.e. at most half of what it edits is what any text of that size would flag (docs/methods.md)."""


NULL_DRAWS = 5
"""Random retain samples the null check draws (``EditPhase.null_draws``)."""


def covered_share(sample: torch.Tensor, rest: torch.Tensor, token_threshold: float) -> float:
    """The share of ``sample``'s tokens that the rule selects against ``rest``."""
    rows = forget_specific_tokens(sample, rest, token_threshold)
    return float(sample[rows].sum()) / max(1, int(sample.sum()))


def null_lift(ctx, token_threshold: float) -> dict:
    """The selection against its null: the share of the forget tokens the selected rows cover, over the mean share
    that the same rule selects when random retain text of the forget set's size stands in for the forget set.

        lift = share(forget vs retain) / mean_d share(sample_d vs rest_d)

    A rule that selects nothing in random text (null share 0) is infinitely above its null when it selects anything
    in the forget text; a rule that selects nothing there has lift 0 (there is nothing to edit).
    """
    forget = covered_share(ctx.token_counts["forget"], ctx.token_counts["retain"], token_threshold)
    null = sum(covered_share(a, b, token_threshold) for a, b in ctx.null_counts) / len(ctx.null_counts)
    return {"forget_token_share": round(forget, 4), "null_token_share": round(null, 4),
            "lift": round(forget / null, 3) if null > 0 else (float("inf") if forget > 0 else 0.0),
            "null_draws": len(ctx.null_counts)}


def edit_token_rows(name, tensor, ctx, token_threshold: float, min_null_lift: float = 0.0):
    """The edit phase's function: the input embedding's forget-specific rows to the mean row, nothing else; no row
    at all when the selection is not above its null by ``min_null_lift`` (the notes say which, with the shares)."""
    if name != ctx.embedding:
        return None
    rows = forget_specific_tokens(ctx.token_counts["forget"], ctx.token_counts["retain"], token_threshold)
    ctx.notes.update(rows_selected=int(rows.sum()))
    if min_null_lift > 0:
        ctx.notes.update(null_lift(ctx, token_threshold), min_null_lift=min_null_lift)
        if ctx.notes["lift"] < min_null_lift:
            ctx.notes["edited"] = False
            log.info("token rows: the %d selected rows cover %.1f%% of the forget tokens, random retain text of the "
                     "same size %.1f%% (lift %.2f < %.2f): not forget-specific, no row edited",
                     ctx.notes["rows_selected"], 100 * ctx.notes["forget_token_share"],
                     100 * ctx.notes["null_token_share"], ctx.notes["lift"], min_null_lift)
            return None
    ctx.notes["edited"] = True
    rows = rows[:tensor.shape[0]]  # a padded embedding table has rows no token reaches
    return mean_rows(tensor, rows)


def check_rows_knobs(token_threshold: float, min_null_lift: float = 0.0) -> None:
    if not token_threshold > 1:
        raise ConfigError(f"method.params.token_threshold: expected > 1 (a token used more often in the forget text "
                          f"than in the retain text), got {token_threshold}")
    if not min_null_lift >= 0:
        raise ConfigError(f"method.params.min_null_lift: expected >= 0 (0 = no null check), got {min_null_lift}")


@dataclass(frozen=True, kw_only=True)
class TokenRows(PhasedMethod):
    token_threshold: float = 3.0
    """tau: the forget/retain per-token rate ratio from which a token counts as forget-specific."""
    min_null_lift: float = MIN_NULL_LIFT
    """Edit only when the selected rows cover at least this many times the share of the forget tokens that the same
    rule selects in random retain text of the forget set's size (``null_lift``); 0 edits always."""

    citation: ClassVar = ("dsunlearn (docs/tuning.md, the twin probe); the generic-token idea of Eldan and "
                          "Russinovich 2023 (arXiv:2310.02238)")

    def __post_init__(self):
        check_rows_knobs(self.token_threshold, self.min_null_lift)

    def phases(self):
        return (rows_phase(self),)

    def edit(self, name, tensor, ctx):
        return edit_token_rows(name, tensor, ctx, self.token_threshold, self.min_null_lift)


def rows_phase(m) -> EditPhase:
    """The edit phase of ``m`` (a method with ``edit``, ``min_null_lift``): token counts, and the null's draws."""
    return EditPhase("rows", m.edit, statistics=("forget", "retain"), null_draws=NULL_DRAWS if m.min_null_lift else 0)
