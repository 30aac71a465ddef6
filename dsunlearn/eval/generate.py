"""Batched greedy decoding across ranks, under ZeRO-3, and the verbatim-memorisation score of what comes out.

``greedy_continuations`` cuts the prompts into fixed batches of ``batch_size`` in prompt order (the same batches at
every world size, so every prompt is decoded in the same padded batch: 2 ranks give 1 rank's token ids) and deals the
batches to the ranks round-robin. Each batch is one ``transformers`` ``generate`` call: greedy, with the KV cache,
left padding and an attention mask (positions follow the mask, as ``generate`` computes them), stopping a row at
EOS. Under ZeRO-3 every forward is collective, so ``synced_gpus`` keeps the ranks stepping together until every rank's
batch is done, and a rank with fewer batches decodes its first batch again and drops the result.

``scored_generations`` scores what comes out by ROUGE-L F1 against the truth (``rouge-score``, no stemmer, as MUSE;
open-unlearning turns the stemmer on): MUSE's VerbMem and KnowMem (Shi et al. 2024, arXiv 2407.06460), whose prompt
sets ``eval/memorisation.py`` builds.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import engine as E


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, max_len]``, each prompt right-aligned (pads on the left)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generated_tokens(row: torch.Tensor, pad_id: int, eos_id: Optional[int]) -> list[int]:
    """One row of ``generate``'s new tokens up to (not including) its first EOS; a row that ends early is padded."""
    out = row.tolist()
    if eos_id is not None and eos_id in out:
        return out[:out.index(eos_id)]
    return out


@torch.no_grad()
def greedy_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                         eos_id: Optional[int], batch_size: int = 16) -> list[list[int]]:
    """The greedy continuation (token ids, EOS excluded) of every prompt, the same list on every rank.

    ``model``: a ``transformers`` model, a PEFT model, or a DeepSpeed engine (its ``module`` decodes; under ZeRO-3
    its hooks gather the parameters at each forward). Call it on every rank with the same prompts.
    """
    from transformers import GenerationConfig
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_continuations: every prompt needs at least one token")
    module = getattr(model, "module", model)
    world, rank = E.world_size(), E.rank()
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    mine = batches[rank::world]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=pad_id, eos_token_id=eos_id)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    found: dict[int, list[int]] = {}
    for call in range(math.ceil(len(batches) / world)):
        rows = mine[call] if call < len(mine) else batches[0]  # a rank out of batches still steps with the others
        batch = {k: v.to(device) for k, v in left_padded([prompts[i] for i in rows], pad_id).items()}
        out = module.generate(**batch, generation_config=config, synced_gpus=world > 1)
        new = out[:, batch["input_ids"].shape[1]:].cpu()
        if call < len(mine):
            found.update({i: generated_tokens(new[j], pad_id, eos_id) for j, i in enumerate(rows)})
    if was_training:
        module.train()
    merged: dict[int, list[int]] = {}
    for part in E.all_gather_objects(found):
        merged.update(part)
    return [merged[i] for i in range(len(prompts))]


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (``rouge-score``'s tokenizer: lower-cased words)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def scored_generations(model, prompts: Sequence[Sequence[int]], truths: Sequence[str], tokenizer,
                       max_new_tokens, batch_size: int = 16, cut=None) -> dict:
    """Greedy continuations of ``prompts`` scored by ROUGE-L F1 against ``truths`` (texts): the one scorer of VerbMem
    and KnowMem, for every model. ``max_new_tokens``: an int, or one int per prompt (each generation is cut to its
    own; the batch decodes to the largest). ``cut(text) -> text`` trims each decoded generation before scoring
    (KnowMem: the answer ends at the first line break). ``{"score": mean F1, "num_prompts": n, "per_prompt": [F1],
    "generated": [ids]}``."""
    limits = list(max_new_tokens) if not isinstance(max_new_tokens, int) else [max_new_tokens] * len(prompts)
    generated = greedy_continuations(model, prompts, max(limits), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                     batch_size)
    generated = [g[:n] for g, n in zip(generated, limits)]
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    scores = rouge_l_f1([cut(t) if cut else t for t in texts], list(truths))
    return {"score": sum(scores) / len(scores), "num_prompts": len(scores), "per_prompt": scores,
            "generated": generated}


QA_TEMPLATE = "Question: {question}\nAnswer: "
"""KnowMem's prompt per question, after the in-context examples (each ``QA_TEMPLATE`` + answer + a blank line), as
MUSE writes it."""


def knowmem_prompt(question: str, examples: Sequence[tuple[str, str]] = ()) -> str:
    shots = "".join(QA_TEMPLATE.format(question=q) + a + "\n\n" for q, a in examples)
    return shots + QA_TEMPLATE.format(question=question)


def first_line(text: str) -> str:
    """The answer a model gives to a ``QA_TEMPLATE`` prompt: its text up to the first line break, stripped."""
    return text.split("\n", 1)[0].strip()
