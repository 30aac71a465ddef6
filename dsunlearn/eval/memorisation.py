"""Generated memorisation metrics of a run: which prompts, one scorer for every model, the verdict's verbatim test.

- **VerbMem** (MUSE, Shi et al. 2024, arXiv 2407.06460) per split: forget, approximate and retain chunks (the report
  part when the run chooses a step), cut after ``eval.memorisation_prefix`` tokens, decoded greedily for at most
  ``eval.verbmem_tokens``, ROUGE-L F1 against the true continuation. With ``eval.verbmem_file`` (MUSE's
  ``verbmem/forget.json``) the forget prompts and truths are that file's ``prompt`` and ``gt``.
- **KnowMem** (MUSE) on ``eval.knowmem_forget`` and ``eval.knowmem_retain``: ``{"question", "answer"}`` pairs, the
  in-context examples of ``<name>_icl<.ext>`` before each question, ROUGE-L F1 of the greedy first-line answer.

``prompt_sets`` builds the prompts once; ``score_model`` scores one model on all of them (the state before, the
exported model, the twin and ``dsunlearn eval``'s model all go through it). The scores of the token ids each model
wrote go to ``generations.json`` in the run directory; ``metrics.json`` keeps the scores.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..config import ConfigError, RunConfig
from .generate import first_line, knowmem_prompt, scored_generations

VERBMEM_SPLITS = ("forget", "approximate", "retain")
MIN_VERBMEM_BAND = 0.05
SAMPLES_SHOWN = 5


@dataclass
class PromptSet:
    metric: str            # "verbmem" or "knowmem"
    split: str             # the split (VerbMem) or side (KnowMem) it scores
    prompts: list          # token ids per prompt
    truths: list           # true continuation / answer text per prompt
    max_new_tokens: list   # per prompt
    source: str            # "chunks" or the file it came from
    truth_ids: Optional[list] = None  # the true continuation's token ids (chunk VerbMem: the report's samples)
    examples: int = 0      # KnowMem: in-context examples before each question
    cut_first_line: bool = False

    @property
    def key(self) -> str:
        return f"{self.metric}/{self.split}"


def read_pairs(path: str, fields: tuple[str, str]) -> list[tuple[str, str]]:
    """A JSON list (or JSONL, or parquet) of objects with both ``fields`` (strings), as pairs, in file order."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: file not found")
    if p.suffix == ".parquet":
        import datasets
        rows = datasets.load_dataset("parquet", data_files=str(p), split="train").to_list()
    else:
        text = p.read_text(encoding="utf-8")
        try:
            if text.lstrip().startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON ({e.msg}, line {e.lineno})") from None
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in fields):
            raise ConfigError(f"{path}: entry {i}: expected an object with string fields "
                              f"{' and '.join(repr(f) for f in fields)}")
        out.append((row[fields[0]], row[fields[1]]))
    if not out:
        raise ConfigError(f"{path}: no entries")
    return out


def icl_file(path: str) -> Optional[Path]:
    """MUSE's in-context examples beside a QA file: ``forget_qa.json`` -> ``forget_qa_icl.json`` (or ``-icl``)."""
    p = Path(path)
    for sep in ("_", "-"):
        candidate = p.with_name(f"{p.stem}{sep}icl{p.suffix}")
        if candidate.is_file():
            return candidate
    return None


def chunk_verbmem_set(split: str, chunks: Sequence[Sequence[int]], tokenizer, prefix: int,
                      max_new_tokens: int) -> Optional[PromptSet]:
    """VerbMem on chunks: prompt = a chunk's first ``prefix`` tokens, truth = the next tokens (at most
    ``max_new_tokens``; a shorter chunk's generation is cut to its continuation's length). Chunks no longer than the
    prefix are left out; None when none is left."""
    chunks = [list(c) for c in chunks if len(c) > prefix]
    if not chunks:
        return None
    truth_ids = [c[prefix:prefix + max_new_tokens] for c in chunks]
    return PromptSet("verbmem", split, [c[:prefix] for c in chunks],
                     [tokenizer.decode(t, skip_special_tokens=True) for t in truth_ids], [len(t) for t in truth_ids],
                     "chunks", truth_ids=truth_ids)


def knowmem_set(side: str, pairs: Sequence[tuple[str, str]], tokenizer, examples: Sequence[tuple[str, str]],
                max_new_tokens: int, source: str) -> PromptSet:
    """KnowMem: each question after the in-context ``examples`` (``generate.knowmem_prompt``), answered in at most
    ``max_new_tokens`` and cut at its first line break, scored against its answer."""
    return PromptSet("knowmem", side, [tokenizer(knowmem_prompt(q, examples))["input_ids"] for q, _ in pairs],
                     [a for _, a in pairs], [max_new_tokens] * len(pairs), source, examples=len(examples),
                     cut_first_line=True)


def prompt_sets(cfg: RunConfig, splits: dict, rows_of, tokenizer) -> list[PromptSet]:
    """Every prompt set of the run (empty when ``eval.generation_prompts`` is 0). ``rows_of(split)``: the chunk
    indices of a split to take prompts from (the report part, or all); ``splits``: ``runner.EvalSplit`` by name."""
    e = cfg.eval
    n = e.generation_prompts
    if not n:
        return []
    sets = []
    for name in VERBMEM_SPLITS:
        if name == "forget" and e.verbmem_file:
            pairs = read_pairs(e.verbmem_file, ("prompt", "gt"))[:n]
            sets.append(PromptSet("verbmem", name, [tokenizer(p)["input_ids"] for p, _ in pairs],
                                  [gt for _, gt in pairs], [e.verbmem_tokens] * len(pairs), e.verbmem_file))
            continue
        split = splits.get(name)
        if split is None or not e.memorisation_prefix:
            continue
        usable = [split.input_ids[i] for i in rows_of(name) if len(split.input_ids[i]) > e.memorisation_prefix][:n]
        found = chunk_verbmem_set(name, usable, tokenizer, e.memorisation_prefix, e.verbmem_tokens)
        if found is not None:
            sets.append(found)
    for side, path in (("forget", e.knowmem_forget), ("retain", e.knowmem_retain)):
        if not path:
            continue
        icl = icl_file(path)
        sets.append(knowmem_set(side, read_pairs(path, ("question", "answer"))[:n], tokenizer,
                                read_pairs(str(icl), ("question", "answer")) if icl else [], e.knowmem_tokens, path))
    return sets


def describe_sets(sets: Sequence[PromptSet], cfg: RunConfig, part: Optional[str]) -> dict:
    """What was generated, for metrics.json and the report (no scores)."""
    return {"prefix": cfg.eval.memorisation_prefix, "verbmem_tokens": cfg.eval.verbmem_tokens,
            "knowmem_tokens": cfg.eval.knowmem_tokens, "part": part, "stemmer": False,
            "sets": {s.key: {"num_prompts": len(s.prompts), "source": s.source,
                             **({"examples": s.examples} if s.metric == "knowmem" else {})} for s in sets}}


def score_set(model, s: PromptSet, tokenizer, batch_size: int = 16) -> dict:
    """One model on one prompt set: ``generate.scored_generations``' dict (``score``, ``per_prompt``, ...)."""
    return scored_generations(model, s.prompts, s.truths, tokenizer, s.max_new_tokens, batch_size,
                              cut=first_line if s.cut_first_line else None)


def score_model(model, sets: Sequence[PromptSet], tokenizer, batch_size: int) -> dict:
    """One model on every prompt set: ``{"scores": {key: mean F1}, "per_prompt": {key: [F1]}, "generated": {key:
    [ids]}}``. Call it on every rank (the decoding is collective under ZeRO-3)."""
    out = {"scores": {}, "per_prompt": {}, "generated": {}}
    for s in sets:
        scored = score_set(model, s, tokenizer, batch_size)
        out["scores"][s.key] = scored["score"]
        out["per_prompt"][s.key] = scored["per_prompt"]
        out["generated"][s.key] = scored["generated"]
    return out


def samples(sets: Sequence[PromptSet], generated: dict, tokenizer, count: int = SAMPLES_SHOWN) -> list[dict]:
    """The report's side-by-side forget prefixes: the prompt, and per token the true continuation and each model's
    generation (``generated``: ``{model label: score_model's "generated"}``), each generated token marked where it
    equals the true token at the same position."""
    forget = next((s for s in sets if s.key == "verbmem/forget"), None)
    if forget is None:
        return []
    piece = lambda i: tokenizer.decode([i], skip_special_tokens=True)  # noqa: E731
    out = []
    for j in range(min(count, len(forget.prompts))):
        truth = forget.truth_ids[j] if forget.truth_ids is not None else \
            tokenizer(forget.truths[j], add_special_tokens=False)["input_ids"]
        row = {"prompt": tokenizer.decode(forget.prompts[j], skip_special_tokens=True),
               "truth": [piece(t) for t in truth], "models": {}}
        for label, gen in generated.items():
            ids = gen[forget.key][j]
            row["models"][label] = [[piece(t), k < len(truth) and t == truth[k]] for k, t in enumerate(ids)]
        out.append(row)
    return out


def verbmem_band(a: Sequence[float], b: Sequence[float]) -> float:
    """Two standard errors of the difference of two mean VerbMem scores (per-prompt F1s), at least
    ``MIN_VERBMEM_BAND``."""
    def var_of_mean(x):
        if len(x) < 2:
            return 0.0
        m = sum(x) / len(x)
        return sum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x)
    return max(MIN_VERBMEM_BAND, 2 * math.sqrt(var_of_mean(a) + var_of_mean(b)))


def verbatim_reference(per_prompt: dict) -> Optional[tuple[str, list, list]]:
    """(what the forget VerbMem is held to, the exported model's forget F1s, the reference F1s), or None: the twin's
    forget VerbMem when there is a twin, else the original's VerbMem on the approximate set (text it never saw)."""
    after = (per_prompt.get("after") or {}).get("verbmem/forget")
    if not after:
        return None
    twin = (per_prompt.get("retrained") or {}).get("verbmem/forget")
    if twin:
        return "the twin's forget VerbMem", after, twin
    unseen = (per_prompt.get("before") or {}).get("verbmem/approximate")
    if unseen:
        return "the original's VerbMem on unseen text (approximate)", after, unseen
    return None
