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

from dataclasses import dataclass
from typing import ClassVar

from ..config import ConfigError
from .phased import EditPhase, PhasedMethod, forget_specific_tokens, mean_rows


def edit_token_rows(name, tensor, ctx, token_threshold: float):
    """The edit phase's function: the input embedding's forget-specific rows to the mean row, nothing else."""
    if name != ctx.embedding:
        return None
    rows = forget_specific_tokens(ctx.token_counts["forget"], ctx.token_counts["retain"], token_threshold)
    rows = rows[:tensor.shape[0]]  # a padded embedding table has rows no token reaches
    return mean_rows(tensor, rows)


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
        return (EditPhase("rows", self.edit, statistics=("forget", "retain")),)

    def edit(self, name, tensor, ctx):
        return edit_token_rows(name, tensor, ctx, self.token_threshold)
