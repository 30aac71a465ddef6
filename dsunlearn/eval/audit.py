"""Does the forgetting last? The relearning and quantization audits, each measured against the retrained twin.

Unlearned models often hide what they knew instead of losing it: a few fine-tuning steps on a little related text
bring it back (Hu et al. 2024, arXiv:2406.13356; Deeb & Roger 2024, arXiv:2410.08827), and so do 4-bit weights
(Zhang et al., ICLR 2025, arXiv:2410.16454). A retrained model also relearns and also moves under quantization, so
each audit asks whether the unlearned model does so *more than the twin*, on the same batches and the same grid.

**Relearning.** The forget set is split by document (seeded, ``audit.relearn_fraction``); the model is fine-tuned on
one part (or on ``audit.relearn_data``) for ``audit.relearn_steps`` optimizer steps of plain next-token NLL, at
``audit.relearn_lr`` (constant). After every step the held-out forget documents are scored: their loss, and every
attack with the held-out forget chunks as members and the approximate set as non-members. The baseline takes the
identical fine-tune (same batches in the same order, same learning rate): the twin, measured on the held-out forget
documents, or without a twin the original model, measured on the approximate set (how far such a fine-tune lowers the
loss of text the model never saw). With ``L0`` the original model's held-out forget loss and ``B0`` the baseline's
loss before the fine-tune, "relearned" means

    loss <= L0 + audit.relearn_within * (B0 - L0)

and the audit fails when the model gets there in fewer steps than the baseline ("never" counts as more than
``audit.relearn_steps``). Nothing is written to the model directories: the fine-tune lives in memory only.

**Quantization.** Every linear layer's weight is rounded to the nearest point of a symmetric b-bit grid with one scale
per ``audit.quantize_group_size`` inputs, or one per row where that does not divide the matrix's width
(``quantization_group``; torchao's ``IntxWeightOnlyConfig``: round-to-nearest, weight-only). A weight-only quantized
layer dequantizes before its matmul, so scoring the dequantized weights is what the quantized model computes, and the
same ZeRO-3 engines score it; the audit counts the matrices per group size it used (``groups``). Every split loss and
attack is rerun for the model and the twin at each width. The audit fails when, at some width, the strongest attack
separates the forget set from unseen text beyond the verdict's unseen-like level (the quantized twin's strongest AUC +
the band, ``eval/verdict.py``) while at full precision it did not.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import engine as E
from ..config import ConfigError, RunConfig, relearn_rates
from ..data import StreamSampler, write_json_atomic
from ..logs import quiet_torchao
from ..methods.terms import chunk_nll
from ..prepare import Prepared, prepare, with_model
from .report import audit_failures, audit_section
from .runner import SCHEMA_VERSION, compact, eval_split, evaluate_model, frozen_engine
from .verdict import MEMBER_SPLIT, NONMEMBER_SPLIT, REFERENCE_ATTACK, attack_name, extreme_attacks, \
    unseen_like_levels

log = logging.getLogger(__name__)

MONITOR_SECTIONS = ("tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "comms_logger")
"""ZeRO JSON sections the audit's fine-tune engine leaves out: it logs nothing of its own."""


# ---------------------------------------------------------------------------------------------------------------------
# Quantization

def quantization_group(in_features: int, group_size: int) -> int:
    """The inputs per scale of a matrix ``in_features`` wide: ``group_size`` where it divides the width, otherwise the
    whole width, one scale per row (per-channel: ``group_size=-1`` in GPTQ's and AWQ's terms). Never a smaller group
    than configured: a group of gcd(width, group_size) (2 for a width of 50 and 128) would make a 4-bit audit nearly
    lossless while the report claimed 128; one per row is coarser, the conservative side for an audit that asks
    whether rounding brings the forget set back. torchao refuses a group of 1 (``config.validate`` refuses
    ``audit.quantize_group_size=1``)."""
    if group_size < 2:
        raise ValueError(f"quantization group size {group_size}: expected >= 2 (torchao refuses 1)")
    return group_size if in_features % group_size == 0 else in_features


def quantize_dequantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``weight`` ([out, in]) rounded to nearest on a symmetric ``bits``-bit grid, one scale per group of inputs
    (``quantization_group``: ``group_size``, or the whole row where it does not divide the width), returned
    dequantized in ``weight``'s dtype. torchao does the arithmetic (``IntxWeightOnlyConfig``, per group). The error per
    weight is at most half a step, ``max|w_group| / (2^bits - 1)``.
    """
    with quiet_torchao():
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    out_features, in_features = weight.shape
    layer = torch.nn.Linear(in_features, out_features, bias=False, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(weight.detach().float().cpu())
    quantize_(layer, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                          granularity=PerGroup(quantization_group(in_features, group_size))))
    return layer.weight.dequantize().to(device=weight.device, dtype=weight.dtype)


def quantize_linear_weights_(model: torch.nn.Module, bits: int, group_size: int) -> dict[int, int]:
    """Replace every linear layer's weight of ``model`` (an engine's module; ZeRO-3 partitioned or not) by its
    quantized-dequantized value, in place. A tied weight (lm_head = embedding) is quantized once. Returns
    ``{inputs per scale: number of matrices}`` (``quantization_group``).

    Every rank must call this: each gathers every matrix whole and quantizes it (ZeRO-3 gathers are collective, and
    the arithmetic is the same on every rank); under ZeRO-3 rank 0's result is what is re-partitioned, otherwise every
    rank keeps its own identical copy."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer, its weight stored [in, out]
    seen, groups = set(), Counter()
    for module in model.modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or id(module.weight) in seen:
            continue
        weight = module.weight
        seen.add(id(weight))
        with E.gathered_for_update([weight]), torch.no_grad():
            w = weight.t() if isinstance(module, Conv1D) else weight  # [out, in]
            groups[quantization_group(w.shape[1], group_size)] += 1
            q = quantize_dequantize(w, bits, group_size)
            weight.copy_(q.t() if isinstance(module, Conv1D) else q)
    return dict(sorted(groups.items()))


def strongest(result: dict) -> tuple[str, float]:
    """The strongest attack on ``result`` and its AUC (the reference attack left out: the audits score models that
    have no calibration model)."""
    (name, auc), _ = extreme_attacks(result["mia"], exclude=(REFERENCE_ATTACK,))
    return name, auc


def quantized_results(cfg: RunConfig, ds_config: dict, path: str, splits: dict,
                      pad_id: int) -> tuple[dict[str, dict], dict[str, int]]:
    """(``{"full": result, "8": result, "4": result, ...}``, groups): the model at ``path`` scored at full precision
    and at each width of ``audit.quantize_bits``, each from a fresh load (the weights on disk are never touched), and
    the number of matrices per group size (``{"128": 25, "352": 4}``; every width quantizes the same matrices)."""
    out, groups = {}, {}
    for bits in (None, *cfg.audit.quantize_bits):
        with frozen_engine(cfg, ds_config, path) as frozen:
            if bits is not None:
                groups = {str(g): n for g, n in
                          quantize_linear_weights_(frozen.module, bits, cfg.audit.quantize_group_size).items()}
                if E.is_main():
                    log.info("audit: %s quantized to %d bits (matrices per group size: %s)", path, bits, groups)
            out["full" if bits is None else str(bits)] = evaluate_model(frozen, splits, cfg, pad_id, mia=True)
    return out, groups


def quantize_audit(cfg: RunConfig, ds_config: dict, splits: dict, pad_id: int, model_dir: str,
                   twin_dir: Optional[str]) -> dict:
    """Every split loss and attack at full precision and at each width, for the model and the twin."""
    model, groups = quantized_results(cfg, ds_config, model_dir, splits, pad_id)
    twin, twin_groups = quantized_results(cfg, ds_config, twin_dir, splits, pad_id) if twin_dir else (None, None)
    rows = []
    for width in model:
        result, twin_result = model[width], twin[width] if twin else None
        name, auc = strongest(result)
        high, _low, band = unseen_like_levels(result, twin_result, cfg.eval.auc_band)
        row = {"bits": width, "strongest_attack": name, "strongest_auc": auc, "unseen_like_high": high + band,
               "detectable": auc > high + band,
               "losses": {s: m["loss"] for s, m in result["splits"].items()}}
        if twin_result is not None:
            row["twin_strongest_attack"], row["twin_strongest_auc"] = strongest(twin_result)
            row["twin_losses"] = {s: m["loss"] for s, m in twin_result["splits"].items()}
        rows.append(row)
    full = rows[0]
    for row in rows:
        row["auc_change"] = row["strongest_auc"] - full["strongest_auc"]
        row["loss_change"] = {s: v - full["losses"][s] for s, v in row["losses"].items()}
        if twin is not None:
            row["twin_auc_change"] = row["twin_strongest_auc"] - full["twin_strongest_auc"]
            row["twin_loss_change"] = {s: v - full["twin_losses"][s] for s, v in row["twin_losses"].items()}
    resurfaced = [r for r in rows[1:] if r["detectable"]] if not full["detectable"] else []
    if full["detectable"]:
        finding = (f"already detectable at full precision ({attack_name(full['strongest_attack'])} AUC "
                   f"{full['strongest_auc']:.3f} > {full['unseen_like_high']:.3f})")
    elif resurfaced:
        finding = "; ".join(f"detectable again at {r['bits']} bits: {attack_name(r['strongest_attack'])} AUC "
                            f"{r['strongest_auc']:.3f} > {r['unseen_like_high']:.3f} (full precision "
                            f"{full['strongest_auc']:.3f})" for r in resurfaced)
    else:
        finding = "not detectable at any width: " + ", ".join(
            f"{r['bits']}: AUC {r['strongest_auc']:.3f} <= {r['unseen_like_high']:.3f}" for r in rows)
    return {"bits": list(cfg.audit.quantize_bits), "group_size": cfg.audit.quantize_group_size,
            "groups": groups, "twin_groups": twin_groups,
            "scheme": "torchao IntxWeightOnlyConfig: round-to-nearest, symmetric, per group, weight-only, every "
                      "linear layer",
            "rows": rows, "failed": bool(resurfaced), "applicable": not full["detectable"], "finding": finding,
            "model": {w: compact(r) for w, r in model.items()},
            "twin": {w: compact(r) for w, r in twin.items()} if twin else None}


# ---------------------------------------------------------------------------------------------------------------------
# Relearning

def split_forget_documents(doc_index: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fine-tune chunk rows, held-out chunk rows): a seeded split of the forget set's documents, never of a document's
    chunks (a held-out chunk must not have a sibling in the fine-tune)."""
    docs = sorted(set(doc_index))
    if len(docs) < 2:
        raise ConfigError("audit.relearn_data='forget': the forget set has one document; the relearning audit needs "
                          "at least two (one to fine-tune on, one held out)")
    order = np.random.default_rng([seed, len(docs)]).permutation(len(docs))
    num_train = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    train_docs = {docs[i] for i in order[:num_train]}
    train = [i for i, d in enumerate(doc_index) if d in train_docs]
    held = [i for i, d in enumerate(doc_index) if d not in train_docs]
    return train, held


def relearn_config(cfg: RunConfig, world_size: int, lr: Optional[float] = None) -> RunConfig:
    """The run config of the audit's fine-tune: constant ``lr`` (default: the first of ``audit.relearn_lr``), no
    warm-up, one micro-step per step."""
    a = cfg.audit
    lr = lr if lr is not None else relearn_rates(a, cfg.train.lr)[0]
    train = dataclasses.replace(cfg.train, lr=lr, schedule="constant", warmup_ratio=0.0,
                                micro_batch_size=a.relearn_batch_size // world_size, grad_accum=1,
                                global_batch_size=None, num_steps=a.relearn_steps)
    return dataclasses.replace(cfg, train=train)


def relearn_ds_config(ds_config: dict, per_rank: int, world_size: int) -> dict:
    """The run's resolved ZeRO JSON (sharding, precision, offload) with the fine-tune's batch and no monitors."""
    out = {k: v for k, v in ds_config.items() if k not in MONITOR_SECTIONS}
    out.update(train_micro_batch_size_per_gpu=per_rank, gradient_accumulation_steps=1,
               train_batch_size=per_rank * world_size)
    return out


def curve_point(step: int, result: dict, train_loss: Optional[float]) -> dict:
    name, auc = strongest(result)
    return {"step": step, "train_loss": train_loss, "losses": {s: m["loss"] for s, m in result["splits"].items()},
            "strongest_attack": name, "strongest_auc": auc,
            "aucs": {k: v["auc"] for k, v in result["mia"].items()}}


def relearn_curve(cfg: RunConfig, ds_config: dict, path: str, stream, rows: list[int], splits: dict,
                  pad_id: int) -> dict:
    """Fine-tune the model at ``path`` (in memory) on ``stream``'s chunks ``rows``; score ``splits`` before and after
    every step. The batches are a pure function of (step, rank, seed), so every model audited with the same config
    sees the same chunks in the same order, on any world size; ``batches`` records what was actually fed. The
    arithmetic is the same too only without dropout (its masks come from each rank's random stream)."""
    world, rank, t = E.world_size(), E.rank(), cfg.train
    model, handle = E.load_model(with_model(cfg, path), ds_config, path=path)
    engine = E.build_train_engine(model, ds_config, cfg, t.num_steps)
    sampler = StreamSampler(num_chunks=len(rows), per_rank=t.micro_batch_size, grad_accum=1, world_size=world,
                            seed=t.seed)
    points = [curve_point(0, evaluate_model(engine, splits, cfg, pad_id), None)]
    batches = []
    for step in range(t.num_steps):
        engine.train()
        E.forget_zero3_release_decisions()  # the evaluation's no-grad forwards left a stale release memo
        local = [rows[i] for i in sampler.indices(step, 0, rank)]
        batch = stream.batch(local, cfg.data.seq_len, pad_id)
        logits = E.forward(engine, batch).logits
        # The mean of per-chunk means: with equal chunks per rank, DeepSpeed's average over ranks is the same figure
        # as one rank's mean over the whole global batch.
        loss = chunk_nll(logits, batch["labels"].to(logits.device)).mean()
        del logits  # the last reference to [B, T, V]: freed by the backward, not kept through the evaluation below
        engine.backward(loss)
        engine.step()
        loss = float(loss.detach())
        batches.append([r for part in E.all_gather_objects(local) for r in part])
        train_loss = E.all_reduce_sum(torch.tensor([loss], dtype=torch.float64)).item() / world
        points.append(curve_point(step + 1, evaluate_model(engine, splits, cfg, pad_id), train_loss))
        if E.is_main():
            p = points[-1]
            log.info("audit relearn %s step %d: train %.4f, held-out forget %.4f, strongest AUC %.3f", path,
                     step + 1, train_loss, p["losses"][MEMBER_SPLIT], p["strongest_auc"])
    engine = model = handle = None
    E.release_engines()
    return {"path": path, "points": points, "batches": batches}


def steps_to(values: list[float], threshold: float) -> Optional[int]:
    """The first step whose value is at or below ``threshold`` (None: never)."""
    return next((i for i, v in enumerate(values) if v <= threshold), None)


def relearn_outcome(model_losses: list[float], baseline_losses: list[float], original_loss: float,
                    within: float) -> tuple[float, Optional[int], Optional[int], bool]:
    """(threshold, the model's steps to it, the baseline's, failed) from the two loss curves (index = step, 0 = before
    the fine-tune) and the original model's loss: threshold = L0 + within * (B0 - L0); the audit fails when the
    model reaches it in fewer steps than the baseline (never = more than the fine-tune's length)."""
    threshold = original_loss + within * (baseline_losses[0] - original_loss)
    model_steps, baseline_steps = steps_to(model_losses, threshold), steps_to(baseline_losses, threshold)
    failed = model_steps is not None and (baseline_steps is None or model_steps < baseline_steps)
    return threshold, model_steps, baseline_steps, failed


def relearn_audit(p: Prepared, model_dir: str, twin_dir: Optional[str], original_dir: str) -> dict:
    cfg, tok, pad_id = p.cfg, p.tokenizer, p.tokenizer.pad_token_id
    a = cfg.audit
    forget = p.eval_streams[MEMBER_SPLIT]
    if a.relearn_data == MEMBER_SPLIT:
        rows, held = split_forget_documents(list(forget.chunks["doc_index"]), a.relearn_fraction, cfg.train.seed)
        held_chunks = forget.chunks.select(held)
    else:
        rows, held_chunks = list(range(p.relearn_stream.stats.num_chunks)), forget.chunks
    splits = {MEMBER_SPLIT: eval_split(MEMBER_SPLIT, held_chunks, cfg, tok),
              NONMEMBER_SPLIT: eval_split(NONMEMBER_SPLIT, p.eval_streams[NONMEMBER_SPLIT].chunks, cfg, tok)}
    # eval_split keeps a seeded sample of at most eval.max_chunks: the count said is the count scored.
    measured = {name: len(split.input_ids) for name, split in splits.items()}
    n, capped = measured[MEMBER_SPLIT], measured[MEMBER_SPLIT] < len(held_chunks)
    if a.relearn_data == MEMBER_SPLIT:
        data = (f"forget set: {len(set(forget.chunks.select(rows)['doc_index']))} of {forget.stats.num_documents} "
                f"documents ({len(rows)} chunks); measured on "
                + (f"{n} of the other {len(held)} chunks (eval.max_chunks)" if capped else f"the other {n} chunks"))
    else:
        data = (f"{a.relearn_data} ({len(rows)} chunks); measured on "
                + (f"{n} of the forget set's {len(held_chunks)} chunks (eval.max_chunks)" if capped
                   else f"the whole forget set ({n} chunks)"))
    rates = relearn_rates(a, cfg.train.lr)
    original = None
    if twin_dir:
        with frozen_engine(cfg, p.ds_config, original_dir) as frozen:
            original = curve_point(0, evaluate_model(frozen, splits, cfg, pad_id), None)
    # The same fine-tune at every rate, for the model and its baseline; the worst rate decides and leads the report.
    runs = [relearn_at(p, lr, model_dir, twin_dir, original_dir, rows, splits, original) for lr in rates]
    worst = max(runs, key=lambda r: (r["failed"], r["margin"]))
    per_rate = [{k: r[k] for k in ("lr", "threshold", "model_steps_to_relearn", "baseline_steps_to_relearn",
                                   "failed", "final")} for r in runs]
    finding = worst["finding"] if len(runs) == 1 else (
        f"at lr {worst['lr']:g}, the worst of {len(runs)} rates: {worst['finding']} (every rate: "
        + "; ".join(f"lr {r['lr']:g} {r['said_model']} vs {r['said_baseline']}" for r in runs) + ")")
    out = {k: v for k, v in worst.items() if k not in ("margin", "said_model", "said_baseline")}
    return {**out, "data": data, "measured_chunks": measured, "held_out_chunks": len(held_chunks),
            "steps": a.relearn_steps, "batch_size": a.relearn_batch_size, "within": a.relearn_within,
            "rates": per_rate, "finding": finding}


def relearn_at(p: Prepared, lr: float, model_dir: str, twin_dir: Optional[str], original_dir: str, rows: list[int],
               splits: dict, original: Optional[dict]) -> dict:
    """The relearning audit at one learning rate: the model's and the baseline's curves and the outcome.
    ``original``: the original model scored (None without a twin: the baseline's first point is the original)."""
    cfg, a, pad_id = p.cfg, p.cfg.audit, p.tokenizer.pad_token_id
    rcfg = relearn_config(cfg, p.world_size, lr)
    rds = relearn_ds_config(p.ds_config, rcfg.train.micro_batch_size, p.world_size)
    model = relearn_curve(rcfg, rds, model_dir, p.relearn_stream, rows, splits, pad_id)
    # The baseline: the twin on the held-out forget documents, or (no twin) the original model on unseen text.
    baseline_dir, baseline_split = (twin_dir, MEMBER_SPLIT) if twin_dir else (original_dir, NONMEMBER_SPLIT)
    baseline = relearn_curve(rcfg, rds, baseline_dir, p.relearn_stream, rows, splits, pad_id)
    original = original or baseline["points"][0]
    threshold, model_steps, baseline_steps, failed = relearn_outcome(
        [q["losses"][MEMBER_SPLIT] for q in model["points"]], [q["losses"][baseline_split] for q in baseline["points"]],
        original["losses"][MEMBER_SPLIT], a.relearn_within)
    who = "the twin" if twin_dir else "the original model on unseen text"
    said = lambda k: "not within %d steps" % a.relearn_steps if k is None else f"{k} steps"  # noqa: E731
    never = a.relearn_steps + 1
    last_model, last_base = model["points"][-1], baseline["points"][-1]
    return {"lr": lr, "baseline": "twin" if twin_dir else "original on approximate", "baseline_split": baseline_split,
            "original": original, "threshold": threshold,
            "model_steps_to_relearn": model_steps, "baseline_steps_to_relearn": baseline_steps,
            "final": {"model_forget_loss": last_model["losses"][MEMBER_SPLIT],
                      "model_strongest_auc": last_model["strongest_auc"],
                      "baseline_loss": last_base["losses"][baseline_split],
                      "baseline_strongest_auc": last_base["strongest_auc"]},
            "failed": failed, "model": model, "baseline_curve": baseline,
            # How many steps sooner than the baseline the model relearns (the worst rate has the largest).
            "margin": (baseline_steps if baseline_steps is not None else never)
                      - (model_steps if model_steps is not None else never),
            "finding": (f"held-out forget loss back within {a.relearn_within:g} of the original's ({threshold:.3f} "
                        f"nats): {said(model_steps)}; {who}: {said(baseline_steps)}"),
            "said_model": said(model_steps), "said_baseline": said(baseline_steps)}


# ---------------------------------------------------------------------------------------------------------------------
# Both audits, the command, the report

def run_audits(p: Prepared, model_dir: str, twin_dir: Optional[str], original_dir: str) -> dict:
    """The audits ``p.audits`` of ``model_dir`` (every rank calls this). No engine may be alive: each audit loads the
    models it needs and frees them."""
    out: dict = {"model": model_dir, "twin": twin_dir, "original": original_dir}
    if "relearn" in p.audits:
        out["relearn"] = relearn_audit(p, model_dir, twin_dir, original_dir)
    if "quantize" in p.audits:
        splits = {n: eval_split(n, s.chunks, p.cfg, p.tokenizer) for n, s in p.eval_streams.items()}
        out["quantize"] = quantize_audit(p.cfg, p.ds_config, splits, p.tokenizer.pad_token_id, model_dir, twin_dir)
    out["failures"] = audit_failures(out)
    return out


def run_audit_command(cfg: RunConfig, zero_path: str, model_dir: str, out_dir: str, twin_dir: Optional[str],
                      audits: tuple) -> dict:
    """``dsunlearn audit``: audit one model directory across all ranks; metrics.json, report.md, plots/ in
    ``out_dir``. The original model (before unlearning) is the chain's original when ``model_dir`` is a removal
    request's ``model/`` (``chain.original_of``, the rule the run's own audits follow), else ``model.path``."""
    from ..chain import original_of
    original_dir = original_of(model_dir, cfg.model.path)
    if not original_dir:
        raise ConfigError("model.path: the audits need the original model (before unlearning) as model.path")
    twin_dir = twin_dir or cfg.eval.retrained_model
    cfg = dataclasses.replace(with_model(cfg, model_dir), eval=dataclasses.replace(cfg.eval,
                                                                                   retrained_model=twin_dir))
    E.init_distributed()
    E.check_model_dir(with_model(cfg, original_dir))
    p = prepare(cfg, zero_path, E.world_size(), train=False, audits=audits)
    if E.is_main():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    E.barrier()
    result = run_audits(p, model_dir, twin_dir, original_dir)
    metrics = {"schema_version": SCHEMA_VERSION, "model": model_dir, "audits": result}
    if E.is_main():
        out = Path(out_dir)
        write_json_atomic(out / "metrics.json", metrics)
        lines = [f"# dsunlearn audit: `{model_dir}`", "",
                 *[f"- **{line}**" for line in result["failures"]],
                 f"- twin: `{twin_dir}`" if twin_dir else "- no twin: the relearning baseline is the original model "
                                                          "on unseen text; the attacks' reference level is 0.5",
                 f"- original: `{original_dir}`", "", *audit_section(result, out)]
        (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    E.barrier()
    return metrics
