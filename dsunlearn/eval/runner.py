"""Distributed evaluation: every rank scores a shard of each split with ONE forward per chunk; stats are gathered.

Used three ways: inside ``unlearn`` (before, every ``eval.every_n_steps``, after), by ``dsunlearn eval --model DIR``,
and for the exactly retrained model when one is given (``eval.retrained_model``).

Under ZeRO-3 every forward is collective (parameters are gathered from all ranks), so every rank runs the same number
of forwards: a rank whose shard is shorter repeats its last chunk and drops the extra result.
"""
from __future__ import annotations

import contextlib
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import engine as E
from ..config import RunConfig
from ..data import collate, rank_batches, write_json_atomic
from ..prepare import prepare, with_model
from ..rundir import RunLogger, RunState
from .metrics import chunk_stats, concat_stats, split_metrics
from .mia import attack_report
from .memorisation import describe_sets, prompt_sets, samples, score_model, verbatim_reference, verbmem_band
from .verdict import (CANNOT_JUDGE, MEMBER_SPLIT, NONMEMBER_SPLIT, REFERENCE_ATTACK, distance_to_retraining,
                      extreme_attacks, forget_shortfall, judge, verdict_line, with_verbatim_criterion)

log = logging.getLogger(__name__)

EARLIER_PREFIX = "forget@"
"""Evaluation splits named ``forget@<k>``: the forget set of the k-th earlier removal request (``chain.py``)."""

SCHEMA_VERSION = 3  # 2: judgement, distance_to_retraining; the verdict from eval/verdict.py. 3: audits


@dataclass
class EvalSplit:
    name: str
    input_ids: list  # list of token-id lists, one per chunk (unpadded)
    texts: list      # decoded text per chunk (zlib attack)
    doc_index: Optional[list] = None  # the document of each chunk (None: one each); the parts split by document

    def documents(self) -> list:
        return self.doc_index if self.doc_index is not None else list(range(len(self.input_ids)))


def eval_split(name: str, chunks, cfg: RunConfig, tokenizer) -> EvalSplit:
    """One split's chunks (a ``datasets.Dataset``), at most ``eval.max_chunks`` of them."""
    if cfg.eval.max_chunks is not None and len(chunks) > cfg.eval.max_chunks:
        # A seeded sample over all documents (the first N chunks would be the first few documents only).
        rng = np.random.default_rng([cfg.train.seed, len(chunks)])
        chunks = chunks.select(np.sort(rng.choice(len(chunks), cfg.eval.max_chunks, replace=False)))
    ids = [list(x) for x in chunks["input_ids"]]
    return EvalSplit(name=name, input_ids=ids, texts=tokenizer.batch_decode(ids, skip_special_tokens=True),
                     doc_index=list(chunks["doc_index"]))


SELECTION, REPORT = "selection", "report"
"""The two parts of every evaluated split when the run chooses its exported step: the step is chosen on one, the
verdict is reported on the other (``document_parts``)."""


def document_parts(splits: dict[str, EvalSplit], fraction: float, seed: int) -> Optional[dict]:
    """``{split: {"selection": chunk indices, "report": chunk indices}}``: each split's documents, shuffled by a
    generator seeded with ``seed`` and the split's document count (so one file splits the same way in every run, and
    as ``forget@k`` in a later request), cut at ``fraction``: those documents choose the step, the others report, as
    validation and test sets. A split of one document cannot be cut: both parts are all of it. None: ``fraction`` 0.
    """
    if not fraction:
        return None
    out = {}
    for name, split in splits.items():
        of_chunk = split.documents()
        docs = np.array(sorted(set(of_chunk)))
        if len(docs) < 2:
            every = list(range(len(of_chunk)))
            out[name] = {SELECTION: every, REPORT: every}
            continue
        order = np.random.default_rng([seed, len(docs), 1013]).permutation(docs)
        cut = min(len(docs) - 1, max(1, int(round(fraction * len(docs)))))
        chosen = set(order[:cut].tolist())
        out[name] = {SELECTION: [i for i, d in enumerate(of_chunk) if d in chosen],
                     REPORT: [i for i, d in enumerate(of_chunk) if d not in chosen]}
    return out


def part_sizes(splits: dict[str, EvalSplit], parts: dict) -> dict:
    """Documents and chunks of each part of each split (metrics.json, the report)."""
    out = {}
    for name, by_part in parts.items():
        of_chunk = splits[name].documents()
        out[name] = {part: {"documents": len({of_chunk[i] for i in rows}), "chunks": len(rows)}
                     for part, rows in by_part.items()}
    return out


def part_of(result: Optional[dict], part: Optional[str]) -> Optional[dict]:
    """The figures of one part of an evaluation (the whole evaluation when it was not split, or ``part`` is None)."""
    if result is None or part is None:
        return result
    return result.get("parts", {}).get(part, result)


def load_eval_splits(cfg: RunConfig, tokenizer, streams: dict) -> dict[str, EvalSplit]:
    """Every configured split of ``eval.splits`` that has data (``streams``: tokenised by ``prepare``)."""
    names = [n for n in cfg.eval.splits if n in streams] + sorted(n for n in streams if n.startswith(EARLIER_PREFIX))
    return {name: eval_split(name, streams[name].chunks, cfg, tokenizer) for name in names}


@torch.no_grad()
def score_split(model_engine, split: EvalSplit, seq_len: int, pad_id: int, micro_batch: int,
                ref_nll: Optional[torch.Tensor] = None, memorisation_prefix: int = 0) -> dict[str, torch.Tensor]:
    """Per-chunk stats for the whole split, identical on every rank, in the split's chunk order."""
    batches = rank_batches(len(split.input_ids), micro_batch, E.rank(), E.world_size())
    mine = [i for rows in batches for i in rows]
    parts = []
    for rows in batches:
        real = len(rows)
        idx = rows + [mine[-1] if mine else 0] * (micro_batch - real)  # full batches: the shapes stay fixed
        batch = collate([split.input_ids[i] for i in idx], seq_len, pad_id)
        logits = E.forward(model_engine, batch).logits
        stats = chunk_stats(logits, batch["labels"].to(logits.device), texts=[split.texts[i] for i in idx],
                            ref_nll=None if ref_nll is None else ref_nll[idx], memorisation_prefix=memorisation_prefix)
        parts.append({k: v[:real].cpu() for k, v in stats.items()})
    local = concat_stats(parts) if mine else {}
    gathered = E.all_gather_objects((mine, local))
    order, pieces = [], []
    for indices, stats in gathered:
        if indices:
            order.extend(indices)
            pieces.append(stats)
    full = concat_stats(pieces)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {k: v[inverse] for k, v in full.items()}


def attack_reports(members: dict, nonmembers: dict, exclude: tuple = ()) -> dict:
    """Every membership score's attack report (``mia_<name>`` per-chunk scores of both sets), by attack name."""
    return {key[4:]: attack_report(members[key].numpy(), nonmembers[key].numpy())
            for key in sorted(k for k in members if k.startswith("mia_") and k[4:] not in exclude)}


def evaluate_model(model_engine, splits: dict[str, EvalSplit], cfg: RunConfig, pad_id: int, mia: bool = True,
                   ref_nll: Optional[dict] = None, parts: Optional[dict] = None) -> dict:
    """Metrics of every split, membership attacks (forget = members, approximate = non-members), per-chunk losses;
    with ``parts`` (``document_parts``) the same figures of each part under ``"parts"``, from the same forwards."""
    was_training = model_engine.training
    model_engine.eval()
    stats = {name: score_split(model_engine, split, cfg.data.seq_len, pad_id, cfg.eval.micro_batch_size,
                               ref_nll=(ref_nll or {}).get(name), memorisation_prefix=cfg.eval.memorisation_prefix)
             for name, split in splits.items()}
    result = summarise(stats, mia)
    if parts:
        result["parts"] = {part: summarise({n: {k: v[torch.tensor(parts[n][part], dtype=torch.long)]
                                                for k, v in st.items()} for n, st in stats.items()}, mia)
                           for part in (SELECTION, REPORT)}
    if was_training:
        model_engine.train()
    return result


def summarise(stats: dict[str, dict], mia: bool = True) -> dict:
    """The figures of per-chunk stats (``score_split``): every split's metrics and per-chunk loss, the attacks, the
    earlier requests' forget sets, the forget gap."""
    result = {"splits": {n: split_metrics(st) for n, st in stats.items()},
              "chunk_loss": {n: (-st["mia_loss"]).tolist() for n, st in stats.items()}}
    if mia and MEMBER_SPLIT in stats and NONMEMBER_SPLIT in stats:
        result["mia"] = attack_reports(stats[MEMBER_SPLIT], stats[NONMEMBER_SPLIT])
    if mia and NONMEMBER_SPLIT in stats:  # every earlier request's forget set against the same unseen text
        earlier = {}
        for name in sorted(n for n in stats if n.startswith(EARLIER_PREFIX)):
            # No reference attack: it is calibrated on the current forget set's chunks only.
            reports = attack_reports(stats[name], stats[NONMEMBER_SPLIT], exclude=(REFERENCE_ATTACK,))
            (strongest, auc), _ = extreme_attacks(reports)
            earlier[name] = {"aucs": {k: v["auc"] for k, v in reports.items()}, "strongest_attack": strongest,
                             "strongest_auc": auc}
        if earlier:
            result["earlier"] = earlier
    if MEMBER_SPLIT in result["splits"] and NONMEMBER_SPLIT in result["splits"]:
        result["forget_gap"] = result["splits"][MEMBER_SPLIT]["loss"] - result["splits"][NONMEMBER_SPLIT]["loss"]
    return result


def target_loss(cfg: RunConfig, result: dict, before: Optional[dict], retrained: Optional[dict],
                original: Optional[dict] = None, base: Optional[dict] = None) -> Optional[float]:
    """The forget loss at which "the forget set looks unseen" (eval.stop_target). "original_approximate" reads
    ``original`` when given (a later removal request: the chain's original model), else ``before``; with a base model
    (``eval.base_model``) it moves by the base's natural gap:

        target = L_approximate(original) + (L_forget(base) - L_approximate(base))

    A forget text easier than the approximate text by nature (a base below its approximate loss) is then not driven
    up to the approximate loss, which would over-unlearn it."""
    source = {"original_approximate": (original or before, NONMEMBER_SPLIT),
              "current_approximate": (result, NONMEMBER_SPLIT),
              "retrained_forget": (retrained, MEMBER_SPLIT)}[cfg.eval.stop_target]
    model_result, split = source
    if model_result is None or split not in model_result["splits"]:
        return None
    return model_result["splits"][split]["loss"] + (natural_gap(base) if base is not None else 0.0)


def natural_gap(base: dict) -> float:
    """The base model's forget - approximate loss (nats): how much harder the forget text is by nature."""
    return base["splits"][MEMBER_SPLIT]["loss"] - base["splits"][NONMEMBER_SPLIT]["loss"]


def stop_rule_holds(result: dict, cfg: RunConfig) -> bool:
    """The stop rule (on when ``eval.stop_tolerance > 0``): the forget loss has reached ``target - tolerance``, a
    one-sided crossing. A run that overshoots between two evaluations stops at the first one past the crossing; the
    exported weights are then the evaluated step that best meets the verdict's criteria (``Evaluator``)."""
    if cfg.eval.stop_tolerance <= 0 or result.get("target") is None or MEMBER_SPLIT not in result["splits"]:
        return False
    return forget_shortfall(result["splits"][MEMBER_SPLIT]["loss"], result["target"], cfg.eval.stop_tolerance) == 0


def selection(result: dict) -> dict:
    """The twin-free judgement that chose among evaluations (a state saved before it existed: the judgement)."""
    return result.get("selection") or result["judgement"]


def better(candidate: dict, incumbent: Optional[dict]) -> bool:
    """Is ``candidate``'s judgement better than ``incumbent``'s? Forgotten first, then the smaller distance."""
    if incumbent is None:
        return True
    key = lambda j: (0 if j["ok"] else 1, j["distance"])  # noqa: E731
    return key(candidate) < key(incumbent)


def compact(result: dict) -> dict:
    """The figures of one evaluation without per-chunk lists and ROC points (for logs and history)."""
    out = {"splits": result["splits"]}
    for key in ("forget_gap", "target", "target_gap", "judgement", "selection", "distance", "earlier"):
        if result.get(key) is not None:
            out[key] = result[key]
    if "parts" in result:
        out["parts"] = {part: compact(piece) for part, piece in result["parts"].items()}
    if "mia" in result:
        out["mia"] = {k: {m: v[m] for m in ("auc", "balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr")
                          if m in v} for k, v in result["mia"].items()}
    return out


def scalars(result: dict, prefix: str = "eval") -> dict:
    out = {f"{prefix}/{name}/loss": m["loss"] for name, m in result["splits"].items()}
    out.update({f"{prefix}/{name}/accuracy": m["accuracy"] for name, m in result["splits"].items()})
    out.update({f"{prefix}/{name}/{key}": m[key] for name, m in result["splits"].items()
                for key in ("exact_memorisation", "extraction_strength") if m.get(key) is not None})
    if "mia" in result:
        out.update({f"{prefix}/mia/{k}/auc": v["auc"] for k, v in result["mia"].items()})
    figures = result.get("judgement", {}).get("figures", {})
    if "strongest_auc" in figures:
        out[f"{prefix}/mia/strongest_auc"] = figures["strongest_auc"]
    if "privleak" in result.get("distance", {}):
        out[f"{prefix}/privleak"] = result["distance"]["privleak"]
    for key in ("forget_gap", "target_gap"):
        if result.get(key) is not None:
            out[f"{prefix}/{key}"] = result[key]
    return out


def load_frozen(cfg: RunConfig, ds_config: dict, path: str):
    """A model directory as a frozen ZeRO engine (sharded like the trained one) for scoring."""
    from ..zero import reference_config
    ref_cfg = reference_config(ds_config)
    model, handle = E.load_model(cfg, ref_cfg, path=path)
    return E.build_frozen_engine(model, ref_cfg), handle


@contextlib.contextmanager
def frozen_engine(cfg: RunConfig, ds_config: dict, path: str):
    """``with frozen_engine(cfg, ds_config, path) as engine:`` a model directory loaded as a frozen engine
    (``load_frozen``), freed when the block ends, also by an exception, while any other engine stays in use.

    What the block gets is a weak proxy of the engine: a name bound by ``as`` outlives the block, and a strong
    reference there would keep every weight partition alive until it is rebound (in a loop: through the next load).
    Using it after the block raises ``ReferenceError``. The ``HfDeepSpeedConfig`` handle goes too: while it lives,
    transformers builds every model of the process as ZeRO-3 (``engine.load_model``)."""
    engine, handle = load_frozen(cfg, ds_config, path)
    try:
        yield weakref.proxy(engine)
    finally:
        E.release_engine(engine)
        del engine, handle  # the last references: collect() frees the engine
        E.collect()


class Evaluator:
    """Evaluation inside ``unlearn``: history, TensorBoard scalars, the stop rule, best-weights export, the report.

    When the stop rule is on (``eval.stop_tolerance > 0``) the model directory always holds the weights that best met
    it so far (smallest |forget - approximate| gap), exported at the evaluation that found them.
    """

    def __init__(self, cfg: RunConfig, engine, tokenizer, logger, ds_config: dict, run_dir: str, streams: dict,
                 track_best: bool = True, resume_step: Optional[int] = None, standalone: bool = False,
                 original_model: Optional[str] = None, before_model: Optional[str] = None):
        self.cfg, self.engine, self.tokenizer, self.logger = cfg, engine, tokenizer, logger
        self.ds_config = ds_config
        # A phased method (phases.py): "before" is the run's own model, evaluated on a frozen engine, while the
        # trained engine starts from the last phase's boundary. Its last phase repairs (the forget loss falls), so
        # the one-sided stop rule is off; every evaluated step is a candidate for the export.
        self.before_model = before_model
        self.stops = before_model is None
        self.run_dir = Path(run_dir)
        self.pad_id = tokenizer.pad_token_id
        self.splits = load_eval_splits(cfg, tokenizer, streams)
        self.tracks_best = track_best and cfg.eval.stop_tolerance > 0  # config.validate checked the splits it needs
        # ``dsunlearn eval`` scores one model: there is no "before unlearning" to judge it against.
        self.standalone = standalone
        self.split_check: Optional[dict] = None
        self.history: list[dict] = []
        self.best: Optional[dict] = None
        self.last_full: Optional[dict] = None
        self.before: Optional[dict] = None
        self.retrained: Optional[dict] = None
        self.ref_nll = None
        # Choosing a step: on one part of the documents; the verdict is reported on the other (document_parts).
        self.parts = document_parts(self.splits, cfg.eval.selection_fraction, cfg.train.seed) \
            if self.tracks_best else None
        if cfg.eval.retrained_model:  # prepare() has checked the directory
            with frozen_engine(cfg, ds_config, cfg.eval.retrained_model) as frozen:
                self.retrained = evaluate_model(frozen, self.splits, cfg, self.pad_id, mia=cfg.eval.mia,
                                                parts=self.parts)
            for piece in (self.retrained, *self.retrained.get("parts", {}).values()):  # PrivLeak 0: the scale
                piece["distance"] = distance_to_retraining(piece, piece)
            # The retrained model's per-chunk loss calibrates the reference-model attack on the trained one.
            self.ref_nll = {n: torch.tensor(v, dtype=torch.float64) for n, v in self.retrained["chunk_loss"].items()}
        # The model before the forget set (eval.base_model): the target's natural gap and, without a twin, the
        # unseen-like attack levels. Scored like the twin, without the reference attack it would calibrate.
        self.base: Optional[dict] = None
        if cfg.eval.base_model:
            with frozen_engine(cfg, ds_config, cfg.eval.base_model) as frozen:
                self.base = evaluate_model(frozen, self.splits, cfg, self.pad_id, mia=cfg.eval.mia, parts=self.parts)
        # A later removal request (chain.py): the chain's original model is the reference for the target and for
        # utility, so a chain cannot drift away from it one tolerated step at a time.
        self.original = None
        if original_model:
            with frozen_engine(cfg, ds_config, original_model) as frozen:
                self.original = evaluate_model(frozen, self.splits, cfg, self.pad_id, mia=False, parts=self.parts)
        if resume_step is not None:
            self._load_state(resume_step)
        # Generated metrics' prompts, read now so that a bad prompt file fails before the first step.
        rows_of = lambda name: self.parts[name][REPORT] if self.parts else range(len(self.splits[name].input_ids))  # noqa: E731
        self.prompt_sets = prompt_sets(cfg, self.splits, rows_of, tokenizer)

    def _check_split(self, before: dict) -> Optional[dict]:
        """Is the approximate set a fair stand-in for unseen data? (blind baseline + the original model's gap)."""
        from ..split import check_run_data
        cfg = self.cfg
        if not (cfg.eval.split_check and cfg.data.forget and cfg.data.approximate):
            return None
        report = None
        if E.is_main():
            report = check_run_data(cfg, auc_band=cfg.eval.split_check_auc_band, seed=cfg.train.seed,
                                    forget_loss=before["splits"][MEMBER_SPLIT]["loss"],
                                    approx_loss=before["splits"][NONMEMBER_SPLIT]["loss"])
            if not report.passed:
                log.warning("split check FAILED: %s", "; ".join(report.reasons))
            report = {**report.to_dict(), "markdown": report.to_markdown()}
        return E.broadcast_object(report)

    def _state_path(self) -> Path:
        return self.run_dir / "eval_state.json"

    def _save_state(self) -> None:
        if E.is_main():
            write_json_atomic(self._state_path(), {"history": self.history, "before": self.before,
                                            "split_check": self.split_check,
                                            "best": self.best, "last_full": self.last_full})

    def _load_state(self, step: int) -> None:
        """Resume: keep what was evaluated up to the checkpoint's step (later steps are run again)."""
        path = self._state_path()
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        self.history = [h for h in saved["history"] if h["step"] <= step]
        self.before = saved["before"]
        self.split_check = saved.get("split_check")
        best = saved.get("best")
        self.best = best if best and best["entry"]["step"] <= step else None
        last = saved.get("last_full")
        self.last_full = last if saved["history"] and saved["history"][-1]["step"] <= step else None

    def evaluate_before(self) -> None:
        """The state before unlearning: the trained engine at step 0, or ``before_model`` (a phased run)."""
        if self.before_model is None:
            self.evaluate(0, label="before")
            return
        with frozen_engine(self.cfg, self.ds_config, self.before_model) as frozen:
            self.evaluate(0, label="before", engine=frozen)

    def evaluated(self, label: str) -> bool:
        return any(h["label"] == label for h in self.history)

    def evaluate(self, step: int, label: str, engine=None) -> Optional[str]:
        result = evaluate_model(engine or self.engine, self.splits, self.cfg, self.pad_id, mia=self.cfg.eval.mia,
                                ref_nll=self.ref_nll, parts=self.parts)
        if self.before is None:
            self.before = result
            self.split_check = self._check_split(result)
        for part in (None, SELECTION, REPORT) if self.parts else (None,):
            self._set_target(part_of(result, part), part)
        chosen, reported = part_of(result, SELECTION), part_of(result, REPORT)
        result["judgement"] = self.judge(reported, REPORT)
        # What chooses the exported step (and the stop, and a sweep's ranking): only what a user has, on the
        # selection part. The twin and the reference attack it calibrates appear in the report's judgement only.
        result["selection"] = self.judge(chosen, SELECTION, twin_free=True)
        result["distance"] = reported["distance"] = distance_to_retraining(reported, part_of(self.retrained, REPORT))
        entry = {"step": step, "label": label, **compact(result)}
        self.history.append(entry)
        self.last_full = result
        self.logger.scalars(step, scalars(result))
        if E.is_main():
            log.info("eval %s: %s", label, ", ".join(f"{k} {v['loss']:.4f}" for k, v in result["splits"].items()))
            log.info("eval %s: %s", label, verdict_line(result["judgement"]))
        # The original is never the result: the best is chosen among unlearned states only.
        if self.tracks_best and result is not self.before \
                and better(result["selection"], self.best and selection(self.best["result"])):
            self.best = {"entry": entry, "result": result}
            if self.cfg.output.save_model:
                E.export_hf_model(self.engine, self.tokenizer, str(self.run_dir / "model"), E.adapter_dir(self.cfg))
        self._save_state()
        return "stop" if self.stops and step > 0 and stop_rule_holds(chosen, self.cfg) else None

    def _set_target(self, piece: dict, part: Optional[str]) -> None:
        """The forget-loss target of one part (or of the whole evaluation), from the same part of the reference."""
        target = target_loss(self.cfg, piece, part_of(self.before, part), part_of(self.retrained, part),
                             part_of(self.original, part), part_of(self.base, part))
        if target is not None and MEMBER_SPLIT in piece["splits"]:
            piece["target"] = target
            piece["target_gap"] = piece["splits"][MEMBER_SPLIT]["loss"] - target

    def judge(self, result: dict, part: Optional[str] = None, twin_free: bool = False) -> dict:
        """The verdict on ``result`` (the ``part`` of an evaluation, judged against the same part of the state
        before, the twin and the original): against the twin when there is one (the report), or ``twin_free``: as
        if there were none, the reference attack left out (the exported step's choice). Without a twin the base model
        (``eval.base_model``) sets the unseen-like attack levels."""
        e = self.cfg.eval
        before = None if self.standalone else part_of(self.before, part)
        twin = (None if twin_free else part_of(self.retrained, part)) or part_of(self.base, part)
        return judge(result, before, twin, stop_tolerance=e.stop_tolerance,
                     utility_tolerance=e.utility_tolerance, auc_band=e.auc_band,
                     split_check=None if self.standalone else self.split_check,
                     original=part_of(self.original, part), exclude_attacks=(REFERENCE_ATTACK,) if twin_free else ())

    def states_to_generate(self, model_dir: str) -> dict:
        """The model directories generation scores at the end of a run: before, the exported model, the twin."""
        return {"before": self.before_model or self.cfg.model.path, "after": model_dir,
                "retrained": self.cfg.eval.retrained_model}

    def generation(self, models: dict) -> Optional[dict]:
        """VerbMem and KnowMem (eval/memorisation.py) of every model in ``models`` (label -> a model directory,
        loaded as a frozen engine in turn, or an engine already loaded; None is skipped), on the same prompts. Call
        it on every rank, with the run's own engines released. None when generation is off."""
        if not self.prompt_sets:
            return None
        scored = {}
        for label, model in models.items():
            if model is None:
                continue
            loaded = frozen_engine(self.cfg, self.ds_config, str(model)) if isinstance(model, (str, Path)) \
                else contextlib.nullcontext(model)
            with loaded as engine:
                scored[label] = score_model(engine, self.prompt_sets, self.tokenizer, self.cfg.eval.micro_batch_size)
            if E.is_main():
                log.info("generation %s: %s", label,
                         ", ".join(f"{k} {v:.4f}" for k, v in scored[label]["scores"].items()))
        generated = {label: r["generated"] for label, r in scored.items()}
        return {**describe_sets(self.prompt_sets, self.cfg, REPORT if self.parts else None),
                "scores": {label: r["scores"] for label, r in scored.items()},
                "per_prompt": {label: r["per_prompt"] for label, r in scored.items()},
                "samples": samples(self.prompt_sets, generated, self.tokenizer),
                "generated": generated}

    def unjudged_refusal(self) -> Optional[str]:
        """Why the run must not take a step, or None: the stop rule is on and the evaluation before unlearning
        cannot judge the forget set (``eval.allow_unjudged`` lets a user who knows better go on)."""
        judgement = self.before and self.history and selection(self.history[0])
        if not self.tracks_best or self.cfg.eval.allow_unjudged or not judgement \
                or judgement["status"] != CANNOT_JUDGE:
            return None
        return (f"nothing to unlearn by the run's own judgement: {verdict_line(judgement)} (exit code 4; "
                f"eval.allow_unjudged=true trains anyway)")

    def conclude(self, state) -> None:
        """The final evaluation, unless the last one was of the final weights."""
        if not self.history or self.history[-1]["step"] != state.step or self.last_full is None:
            self.evaluate(state.step, label="after")

    def finish(self, state, extra: Optional[dict] = None) -> dict:
        """metrics.json, report.md and plots of the run.
        ``extra`` adds top-level fields: ``cost``, ``audits`` (``eval/audit.py``). Only what was evaluated is
        written: the caller runs ``conclude`` first (``finish.py``); when that failed, "after" is the last evaluation
        that succeeded."""
        last = {"entry": self.history[-1], "result": self.last_full}
        after = (self.best or last) if self.tracks_best else last
        # Split evaluations report the report part (the step was chosen on the other); the whole sets beside.
        reported = {name: part_of(result, REPORT) for name, result in
                    (("before", self.before), ("after", after["result"]), ("retrained", self.retrained),
                     ("original", self.original), ("base", self.base))}
        shown = {name: compact(r) if r else None for name, r in reported.items()}
        extra = dict(extra or {})
        generation = extra.pop("generation", None)
        generated = generation.pop("generated") if generation else None
        if generation:
            self.logger.scalars(state.step, {f"generation/{label}/{key}": v for label, scores in
                                             generation["scores"].items() for key, v in scores.items()})
        judgement = after["result"]["judgement"]
        reference = verbatim_reference(generation["per_prompt"]) if generation and not self.standalone else None
        if reference is not None:
            judgement = with_verbatim_criterion(judgement, reference[0], reference[1], reference[2],
                                                verbmem_band(reference[1], reference[2]))
        shown["after"].update({"judgement": judgement, "selection": after["result"]["selection"]})
        metrics = {
            "schema_version": SCHEMA_VERSION,
            "method": self.cfg.method.name,
            "model": self.cfg.model.path,
            "steps": state.step,
            "stop_reason": state.stop_reason,
            "exported_step": after["entry"]["step"],
            "stop_target": self.cfg.eval.stop_target,
            "memorisation_prefix": self.cfg.eval.memorisation_prefix,
            "verdict": verdict_line(judgement),
            "judgement": judgement,
            "selection": selection(after["result"]),
            "distance_to_retraining": after["result"]["distance"],
            **shown,
            "parts": {"fraction": self.cfg.eval.selection_fraction, "chosen_on": SELECTION, "reported_on": REPORT,
                      "sizes": part_sizes(self.splits, self.parts)} if self.parts else None,
            "all_chunks": {"before": compact(self.before), "after": compact(after["result"])} if self.parts else None,
            "split_check": {k: v for k, v in self.split_check.items() if k != "markdown"} if self.split_check else None,
            "history": self.history,
            "audits": None,
            "chain": None,
            "generation": generation,
            **extra,
        }
        if E.is_main():
            if generated is not None:  # every generated token id, by model and prompt set (the scores: metrics.json)
                write_json_atomic(self.run_dir / "generations.json", {"sets": generation["sets"],
                                                                      "generated": generated})
            write_json_atomic(self.run_dir / "metrics.json", metrics)
            from .report import write_report
            write_report(self.run_dir, metrics, reported["after"], reported["before"], reported["retrained"],
                         split_check=self.split_check)
        return metrics


def run_eval(cfg: RunConfig, zero_path: str, model_dir: str, out_dir: str) -> dict:
    """``dsunlearn eval``: score one model directory on every configured split, across all ranks."""
    E.init_distributed()
    p = prepare(with_model(cfg, model_dir), zero_path, E.world_size(), train=False)
    if E.is_main():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    E.barrier()
    frozen, _handle = load_frozen(p.cfg, p.ds_config, model_dir)
    evaluator = Evaluator(p.cfg, frozen, p.tokenizer, RunLogger(out_dir, 0, 0, enabled=False), p.ds_config, out_dir,
                          p.eval_streams, track_best=False, standalone=True)
    evaluator.evaluate(0, label="model")
    generation = evaluator.generation({"model": frozen})
    metrics = evaluator.finish(RunState(step=0), extra={"generation": generation} if generation else None)
    # Free the frozen engine now: its HfDeepSpeedConfig otherwise lingers in a reference cycle until the next garbage
    # collection, and while it lives transformers treats every model built in this process as ZeRO-3 (zero.Init even
    # inside torch.device("meta")): an in-process caller's next from_config would materialise the whole model.
    evaluator = frozen = _handle = None
    E.release_engines()
    return metrics
