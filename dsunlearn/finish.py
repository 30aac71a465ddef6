"""After the last optimizer step: the ordered parts that finish an unlearning run, in one place.

    part               what                                                           ranks
    checkpoint         the final step's ZeRO checkpoint (a clean end only)            together
    cost               analytic FLOPs of the run, to TensorBoard                      each alone
    final evaluation   unless the last evaluation was of the final weights; with the  together
                       stop rule on it exports the best step it has seen
    export             ``model/`` from the final weights (stop rule off)              together
    chain              ``chain.json``'s result hash: after the last part that exports  rank 0, agreed
    audits             on ``model/``, once the run's engines are released             together
    generation         VerbMem, KnowMem: greedy decoding by the state before,        together
                       ``model/`` and the twin (eval/memorisation.py)
    report             metrics.json, report.md, plots from what was evaluated         rank 0
    summary            summary.json, always                                           rank 0

These parts describe and keep the work; a failure in one must neither lose what exists nor leave a rank waiting.
Before every part that ranks take together, one all-reduce tells each rank whether such a part has failed on any
rank. If one has (the ranks' states may differ), every rank skips the remaining collective parts, still writes what
it has (report, summary: with the errors). A part a rank runs alone (cost, report) stops nothing when it fails. At
the end one more all-reduce makes every rank raise when any rank failed anywhere. Rank-0-only work inside a collective part (writing ``model/``, hashing it)
reaches the other ranks through ``engine.together`` / ``engine.from_main``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import chain as C
from . import engine as E
from .cost import cost_line
from .data import write_json_atomic
from .rundir import save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Runs the finishing parts in order and keeps their errors (the first is raised by ``raise_first``)."""
    errors: list = field(default_factory=list)
    collective_failed: bool = False
    """A part that ranks take together failed here: the ranks' states may differ, so no collective part follows."""

    def local(self, what: str, build: Callable[[], Any]):
        """A part each rank runs alone; on failure: logged, kept, None. Its failure stops nothing that follows."""
        try:
            return build()
        except Exception as e:  # noqa: BLE001 - raised by raise_first once everything that exists is written
            log.error("%s failed after training (what exists is kept): %s", what, e)
            self.errors.append(e)
            return None

    def agree(self, before: str, failed: bool) -> bool:
        """One all-reduce: has any rank ``failed``? A rank that has not learns it as a ``FailedElsewhere``."""
        if not E.any_rank_failed(failed):
            return False
        if not failed:
            self.errors.append(E.FailedElsewhere(f"a part before {before} failed on another rank (see its log)"))
        return True

    def together(self, what: str, build: Callable[[], Any]):
        """A part every rank runs together: skipped on every rank once a collective part failed on any rank."""
        if self.agree(what, self.collective_failed):
            self.collective_failed = True
            log.warning("%s skipped: an earlier part failed", what)
            return None
        failures = len(self.errors)
        out = self.local(what, build)
        self.collective_failed = len(self.errors) > failures
        return out

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


def finish_run(run, state, num_steps: int, exit_code: int, logger, evaluator, started: float, *, plan_cost,
               tokenizer, export: bool, audit: Optional[Callable[[str, str], dict]] = None,
               chain: Optional[dict] = None) -> None:
    """Every part of the table above, in order. ``export``: the final weights may become ``model/`` (the weights
    are good and the run saves a model); ``audit(model_dir, original)`` runs ``eval.audits``; ``chain``: this
    request's chain (None for pretraining)."""
    cfg, run_dir = run.cfg, Path(run.cfg.output.run_dir)
    model_dir = run_dir / "model"
    parts = Parts()
    if exit_code == 0:
        parts.together("final checkpoint",
                       lambda: save_checkpoint(run.engine, str(run_dir), state.step, cfg.checkpoint.keep_last))
    cost = parts.local("cost", lambda: plan_cost(run, state))
    if cost is not None:
        logger.scalars(state.step, {"cost/unlearning_flops": float(cost["unlearning_flops"]),
                                    "cost/flops_per_step": float(cost["flops_per_step"]["total"])})
    if evaluator is not None:
        parts.together("final evaluation", lambda: evaluator.conclude(state))
    # With the stop rule on, the evaluator has already exported the weights that best met it.
    if export and not (evaluator is not None and evaluator.tracks_best):
        parts.together("export", lambda: E.export_hf_model(run.engine, tokenizer, str(model_dir),
                                                           E.adapter_dir(cfg)))
    if chain is not None:
        chain = parts.together("chain record", lambda: C.record_result(cfg, str(run_dir))) or chain
    def release_run_engines():  # the audits and generation load models of their own: free the run's first
        run.engine = run.reference = None
        if evaluator is not None:
            evaluator.engine = None
        E.release_engines()

    audits = None
    if audit is not None and model_dir.is_dir():
        def audits_part():
            release_run_engines()
            return audit(str(model_dir), C.original_of(str(model_dir), cfg.model.path))
        audits = parts.together("audits", audits_part)
        if audits is not None and E.is_main():
            for line in audits["failures"]:
                log.warning("%s", line)
    generation = None
    if evaluator is not None and evaluator.prompt_sets and model_dir.is_dir():
        def generation_part():
            release_run_engines()
            return evaluator.generation(evaluator.states_to_generate(str(model_dir)))
        generation = parts.together("generated memorisation metrics", generation_part)
    errors = lambda: [f"{type(e).__name__}: {e}" for e in parts.errors]  # noqa: E731
    if evaluator is not None:
        extra = {k: v for k, v in (("cost", cost), ("audits", audits), ("chain", chain),
                                   ("generation", generation)) if v is not None}
        parts.local("evaluation report",
                    lambda: evaluator.finish(state, extra={**extra, "model_exported": model_dir.is_dir(),
                                                           "errors": errors()}))
    parts.agree("the summary", bool(parts.errors))  # every rank ends with an error, or none does
    if E.is_main():
        parts.local("summary", lambda: write_json_atomic(run_dir / "summary.json", {
            "steps": state.step, "num_steps": num_steps, "stop_reason": state.stop_reason, "exit_code": exit_code,
            "skipped_steps": state.skipped_steps, "train_seconds": round(state.seconds, 3),
            "wall_seconds": round(time.time() - started, 3), "peak_memory_bytes": E.peak_memory(),
            "cost": cost, "model_exported": model_dir.is_dir(),
            "errors": errors()}))
        if cost is not None:
            log.info("cost: %s", cost_line(cost))
    parts.raise_first()

