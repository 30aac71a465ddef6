"""report.md + PNG plots of an unlearning run (or of one model's evaluation): a user would rather look than read."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .plots import (STATE_NAMES, plot_loss_histograms, plot_memorisation, plot_relearning, plot_roc,
                    plot_split_losses_over_steps)

ROC_ATTACKS = ("loss", "zlib", "min_k_20", "min_k_pp_20", "ref")


def _fmt(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def split_table(columns: dict[str, Optional[dict]]) -> list[str]:
    """Markdown table: one row per split, one column per model state (loss / accuracy)."""
    present = {k: v for k, v in columns.items() if v}
    splits = []
    for v in present.values():
        splits += [s for s in v["splits"] if s not in splits]
    head = "| split | " + " | ".join(f"{name} loss" for name in present) + " | " + \
           " | ".join(f"{name} acc" for name in present) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(present))]
    for s in splits:
        losses = [_fmt(v["splits"].get(s, {}).get("loss")) for v in present.values()]
        accs = [_fmt(v["splits"].get(s, {}).get("accuracy")) for v in present.values()]
        lines.append(f"| {s} | " + " | ".join(losses) + " | " + " | ".join(accs) + " |")
    gaps = [_fmt(v.get("forget_gap")) for v in present.values()]
    lines.append("| **forget − approximate** | " + " | ".join(gaps) + " |" + " |" * len(present))
    target_gaps = [_fmt(v.get("target_gap")) for v in present.values()]
    if any(g != "–" for g in target_gaps):
        lines.append("| **forget − target** | " + " | ".join(target_gaps) + " |" + " |" * len(present))
    return lines


def memorisation_table(columns: dict[str, Optional[dict]]) -> list[str]:
    """Markdown table: exact memorisation and extraction strength per split and model state (when evaluated)."""
    present = {k: v for k, v in columns.items()
               if v and any("exact_memorisation" in m for m in v["splits"].values())}
    if not present:
        return []
    splits = []
    for v in present.values():
        splits += [s for s in v["splits"] if s not in splits]
    lines = ["| split | " + " | ".join(f"{name} exact mem." for name in present) + " | " +
             " | ".join(f"{name} extraction" for name in present) + " |", "|" + "---|" * (1 + 2 * len(present))]
    for s in splits:
        cells = [_fmt(v["splits"].get(s, {}).get(key)) for key in ("exact_memorisation", "extraction_strength")
                 for v in present.values()]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


GENERATED_ROWS = (("verbmem/forget", "VerbMem, forget"), ("verbmem/approximate", "VerbMem, approximate"),
                  ("verbmem/retain", "VerbMem, retain"), ("knowmem/forget", "KnowMem, forget"),
                  ("knowmem/retain", "KnowMem, retain"))


def generation_lines(generation: Optional[dict]) -> list[str]:
    """The generated metrics' paragraph and table (eval/memorisation.py), or nothing when generation did not run."""
    if not generation or not generation.get("scores"):
        return []
    states = list(generation["scores"])
    sets = generation["sets"]
    where = "the report part's" if generation.get("part") else "the"
    lines = [f"Generated, greedy: VerbMem (MUSE) = ROUGE-L F1 (rouge-score, no stemmer) of the continuation a model "
             f"writes after {where} chunks' first {generation['prefix']} tokens (at most "
             f"{generation['verbmem_tokens']} tokens) against the true one; KnowMem = ROUGE-L F1 of its first-line "
             f"answer to a question (at most {generation['knowmem_tokens']} tokens). 1 = verbatim; the twin, which "
             "never saw the forget text, shows the level of unseen text.", "",
             "| metric | prompts | " + " | ".join(STATE_NAMES.get(k, k) for k in states) + " |",
             "|" + "---|" * (2 + len(states))]
    for key, name in GENERATED_ROWS:
        if key in sets:
            src = "" if sets[key]["source"] == "chunks" else f" (`{Path(sets[key]['source']).name}`)"
            lines.append(f"| {name}{src} | {sets[key]['num_prompts']} | " +
                         " | ".join(_fmt(generation["scores"][k].get(key)) for k in states) + " |")
    return lines + [""]


def muse_lines(generation: Optional[dict], columns: dict[str, Optional[dict]]) -> list[str]:
    """MUSE's four criteria (C1 VerbMem on forget, C2 KnowMem on forget, C3 PrivLeak with Min-40%, C4 KnowMem on
    retain) when a MUSE prompt file was used, in MUSE's units (x 100)."""
    if not generation or not any(s["source"] != "chunks" for s in generation["sets"].values()):
        return []
    states = list(generation["scores"])
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
    rows = [("VerbMem on forget (lower is better)", "verbmem/forget"),
            ("KnowMem on forget (lower is better)", "knowmem/forget"),
            ("KnowMem on retain (higher is better)", "knowmem/retain")]
    lines = ["MUSE's criteria (x 100, as MUSE reports them):", "",
             "| criterion | " + " | ".join(STATE_NAMES.get(k, k) for k in states) + " |",
             "|" + "---|" * (1 + len(states))]
    for name, key in rows:
        if key in generation["sets"]:
            lines.append(f"| {name} | " + " | ".join(pct(generation["scores"][k].get(key)) for k in states) + " |")
    column = lambda k: columns.get("after" if k == "model" else k) or {}  # noqa: E731  (dsunlearn eval: "model")
    leak = [pct((column(k).get("distance") or {}).get("privleak_per_attack", {}).get("min_k_40")) for k in states]
    if any(x != "–" for x in leak):
        lines.append("| PrivLeak, Min-40% (0 = like the twin; ours, strongest attack, in the header) | " +
                     " | ".join(leak) + " |")
    return lines + [""]


def _md(text: str) -> str:
    """Text inline in markdown: line breaks shown as ⏎, markup characters escaped."""
    out = text.replace("\\", "\\\\").replace("\n", "⏎ ")
    for ch in "*_`|<>[]#":
        out = out.replace(ch, "\\" + ch)
    return out


def sample_lines(generation: Optional[dict]) -> list[str]:
    """The forget prefixes side by side: the true continuation and each model's, tokens equal to the true token at
    the same position in bold."""
    rows = (generation or {}).get("samples") or []
    if not rows:
        return []
    lines = ["### What each model writes after a forget prefix", "",
             "Tokens in **bold** equal the true continuation's token at the same position.", ""]
    for i, row in enumerate(rows, start=1):
        lines += [f"**{i}.** prefix: {_md(row['prompt'])}", "", f"- truth: {_md(''.join(row['truth']))}"]
        for label, tokens in row["models"].items():
            text = "".join(f"**{_md(t)}**" if hit and t.strip() else _md(t) for t, hit in tokens)
            hits = sum(1 for _, hit in tokens if hit)
            lines.append(f"- {STATE_NAMES.get(label, label)} ({hits}/{len(tokens)} generated tokens match): {text}")
        lines.append("")
    return lines


def mia_table(columns: dict[str, Optional[dict]]) -> list[str]:
    present = {k: v for k, v in columns.items() if v and v.get("mia")}
    if not present:
        return []
    attacks = list(next(iter(present.values()))["mia"])
    lines = ["| attack | " + " | ".join(f"{n} AUC" for n in present) + " | " +
             " | ".join(f"{n} TPR@1%FPR" for n in present) + " |", "|" + "---|" * (1 + 2 * len(present))]
    for a in attacks:
        aucs = [_fmt(v["mia"].get(a, {}).get("auc")) for v in present.values()]
        tprs = [_fmt(v["mia"].get(a, {}).get("tpr_at_1pct_fpr")) for v in present.values()]
        lines.append(f"| {a} | " + " | ".join(aucs) + " | " + " | ".join(tprs) + " |")
    return lines


def base_gap_note(base) -> str:
    """How the base model (eval.base_model) moved the target and set the unseen-like attack levels."""
    if not base or "forget" not in base.get("splits", {}) or "approximate" not in base["splits"]:
        return ""
    gap = base["splits"]["forget"]["loss"] - base["splits"]["approximate"]["loss"]
    return (f", moved by the base model's forget - approximate gap {gap:+.3f} nats; without a twin the base's "
            f"attack AUCs are the unseen-like levels")


def distance_line(distance: dict) -> str:
    """PrivLeak (MUSE) of the strongest attack and TOFU's forget quality, as the report's one line."""
    parts = []
    if "privleak" in distance:
        parts.append(f"PrivLeak {distance['privleak']:+.3f} (attack `{distance['privleak_attack']}`; 0 = the twin, "
                     f"negative = over-unlearned)")
    if "forget_quality" in distance:
        parts.append(f"forget quality (KS p-value vs the twin's per-chunk forget losses) "
                     f"{distance['forget_quality']:.3g}")
    return "; ".join(parts) or "–"


def parts_lines(parts: Optional[dict]) -> list[str]:
    """Which documents chose the exported step and which the figures below are reported on, and how many."""
    if not parts:
        return []
    def size(part):
        return ", ".join(f"{name} {s[part]['documents']} docs / {s[part]['chunks']} chunks"
                         for name, s in parts["sizes"].items())
    return [f"- the step was chosen on the selection part ({size(parts['chosen_on'])}); every figure below is "
            f"reported on the disjoint report part ({size(parts['reported_on'])}); split by document, seeded, "
            f"eval.selection_fraction={parts['fraction']}"]


def memorisation_section(metrics: dict, columns: dict[str, Optional[dict]]) -> list[str]:
    """The report's "Verbatim memorisation" section: teacher-forced table, generated table, MUSE's criteria, the
    forget prefixes side by side; nothing when neither kind was measured."""
    teacher_forced, generated = memorisation_table(columns), generation_lines(metrics.get("generation"))
    if not teacher_forced and not generated:
        return []
    return ["## Verbatim memorisation", "",
            f"Teacher-forced: each chunk's first {metrics.get('memorisation_prefix')} tokens are the prompt; exact "
            "memorisation = the share of the continuation's tokens the model's argmax predicts, extraction strength = "
            "the share of the continuation's end it predicts without a miss (docs/evaluation.md).", "",
            *teacher_forced, "", *generated, *muse_lines(metrics.get("generation"), columns),
            *sample_lines(metrics.get("generation"))]


def write_report(run_dir, metrics: dict, after: dict, before: Optional[dict], retrained: Optional[dict],
                 extra_sections: Optional[list[str]] = None, split_check: Optional[dict] = None) -> Path:
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    history = [{"step": h["step"], **{s: m["loss"] for s, m in h["splits"].items()}} for h in metrics["history"]]
    targets = {}
    if retrained:
        for s in ("forget", "approximate"):
            if s in retrained["splits"]:
                targets[f"retrained: {s}"] = retrained["splits"][s]["loss"]
    images = []
    if len(history) > 1:
        images.append(("Loss per split over steps", plot_split_losses_over_steps(history, plots / "losses.png", targets)))
    if after.get("mia"):
        curves = {a: (after["mia"][a]["fpr"], after["mia"][a]["tpr"], after["mia"][a]["auc"])
                  for a in ROC_ATTACKS if a in after["mia"]}
        images.append(("Membership-inference ROC (forget = members, approximate = non-members), exported weights",
                       plot_roc(curves, plots / "roc.png")))
    if "forget" in after["chunk_loss"] and "approximate" in after["chunk_loss"]:
        images.append(("Per-chunk loss: forget vs approximate",
                       plot_loss_histograms(after["chunk_loss"]["forget"], after["chunk_loss"]["approximate"],
                                            plots / "hist.png",
                                            retrained=(retrained or {}).get("chunk_loss", {}).get("forget"))))
    columns = {"before": before, "after": after, "retrained": retrained}
    memorised = plot_memorisation(columns, metrics.get("generation"), plots / "memorisation.png")
    if memorised is not None:
        images.append(("Verbatim memorisation per split: VerbMem (generated) and exact memorisation "
                       "(teacher-forced)", memorised))
    unreliable = bool(split_check) and not split_check["passed"]
    # Every figure that compares with the approximate set carries the warning when the split check failed.
    caveat = " ⚠ approximate set unreliable (see the split check)" if unreliable else ""
    # An audit that fails overrules a "forgotten" verdict: said before anything else.
    failures = [f"- **{line}**" + (" (the verdict below says forgotten; it did not last)"
                                   if metrics.get("judgement", {}).get("ok") else "")
                for line in audit_failures(metrics.get("audits"))]
    lines = [f"# dsunlearn report: {metrics.get('method', '')}", "", *failures,
             f"- model: `{metrics.get('model')}`",
             f"- steps run: {metrics.get('steps')}; weights exported from step {metrics.get('exported_step')}",
             f"- stop: {metrics.get('stop_reason') or 'planned number of steps reached'}",
             f"- **verdict: {metrics.get('verdict')}**{caveat}",
             f"- distance to retraining: {distance_line(metrics.get('distance_to_retraining') or {})}",
             f"- target forget loss: {_fmt(metrics.get('after', {}).get('target'))} ({metrics.get('stop_target')}"
             f"{base_gap_note(metrics.get('base'))})",
             *parts_lines(metrics.get("parts")),
             *(["- a later removal request: the target and utility are measured against the chain's original model "
                f"(`{metrics['chain']['original']['path']}`), not the previous request's result"]
               if metrics.get("original") and metrics.get("chain") else []), "",
             "## Losses (mean token NLL) and top-1 accuracy", "",
             "`after` = the exported weights; `retrained` = the exactly retrained twin (when given). "
             "Forgotten means: forget loss at the target, no attack beyond the twin's level (or chance), retain and "
             "approximate loss within the utility tolerance (docs/evaluation.md).", "",
             *split_table(columns), *([f"{caveat.strip()}"] if caveat else []), "",
             *memorisation_section(metrics, columns),
             "## Membership inference (AUC 0.5 = indistinguishable; reported as is, never folded)", "",
             *mia_table(columns), *([f"{caveat.strip()}"] if caveat else []), ""]
    lines += earlier_requests_section(after, before, metrics.get("chain"))
    if split_check:
        lines += ["## Split check: is the approximate set a fair stand-in for unseen data?", "",
                  split_check["markdown"], ""]
    if metrics.get("cost"):
        lines += cost_section(metrics["cost"])
    if metrics.get("audits"):
        lines += audit_section(metrics["audits"], run_dir)
    for section in extra_sections or []:
        lines += [section, ""]
    for title, path in images:
        lines += [f"### {title}", "", f"![{title}]({path.relative_to(run_dir)})", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def cost_section(cost: dict) -> list[str]:
    lines = ["## Cost", "", f"- parameters: {cost['num_params']:,}",
             f"- FLOPs per optimizer step: {cost['flops_per_step']['total']:.3g} "
             f"({'LoRA train' if cost['flops_per_step'].get('adapter_train') else 'train'} "
             f"{cost['flops_per_step']['train'] + cost['flops_per_step'].get('adapter_train', 0):.3g}, reference forward "
             f"{cost['flops_per_step']['reference_forward']:.3g})",
             f"- unlearning FLOPs: {cost['unlearning_flops']:.3g} over {cost['steps']} steps "
             f"(+ one-time forwards {cost['one_time_forward_flops']:.3g})"]
    if "retrain" in cost:
        r = cost["retrain"]
        lines += [f"- retraining from scratch (6·N·D, N = {r['num_matmul_params']:,} matmul weights): "
                  f"{r['retrain_flops']:.3g} FLOPs: "
                  f"**{r['ratio']:.3g}x** the unlearning run"]
        if r.get("retrain_seconds"):
            lines += [f"- at this run's measured throughput: retraining ≈ {r['retrain_seconds']:.3g} s vs "
                      f"unlearning {r['unlearning_seconds']:.3g} s"]
    return lines + [""]


def audit_status(result: dict) -> str:
    """"FAILED", "passed", or "not applicable" (the quantization audit of a forget set that attacks already detect at
    full precision: there is nothing for quantization to bring back)."""
    if result.get("failed"):
        return "FAILED"
    return "passed" if result.get("applicable", True) else "not applicable"


def audit_failures(audits: Optional[dict]) -> list[str]:
    """One line per failed audit (the report's first lines)."""
    if not audits:
        return []
    return [f"the {name} audit fails: {audits[name]['finding']}" for name in ("relearn", "quantize")
            if audits.get(name, {}).get("failed")]


def quantization_groups_line(groups: Optional[dict], group_size: int) -> str:
    """The groups the quantization audit used, from its count of matrices per group size (``audit.quantization_group``):
    "one scale per 128 inputs: 25 matrices; one scale per row where 128 does not divide the width: 4 matrices 352
    wide"."""
    if not groups:  # metrics written before the audit counted its groups: only the configured size is known
        return f"group size {group_size} configured (the groups used were not recorded)"
    configured = groups.get(str(group_size), 0)
    rows = [f"{n} {'matrix' if n == 1 else 'matrices'} {w} wide" for w, n in groups.items() if w != str(group_size)]
    line = f"one scale per {group_size} inputs: {configured} {'matrix' if configured == 1 else 'matrices'}"
    return line + (f"; one scale per row where {group_size} does not divide the width: {', '.join(rows)}" if rows
                   else "")


def audit_section(audits: dict, run_dir: Path) -> list[str]:
    """The report's audit section (markdown) and its relearning plot."""
    lines = ["## Audits: does the forgetting last? (docs/evaluation.md)", ""]
    r = audits.get("relearn")
    if r:
        twin = r["baseline"] == "twin"
        lines += [f"### Relearning: {audit_status(r)}", "",
                  f"- fine-tune: {r['steps']} steps, {r['batch_size']} chunks per step, lr {r['lr']:g}, on {r['data']}",
                  f"- {r['finding']}",
                  f"- after the fine-tune: held-out forget loss {r['final']['model_forget_loss']:.3f}, strongest AUC "
                  f"{r['final']['model_strongest_auc']:.3f}; {r['baseline']}: loss {r['final']['baseline_loss']:.3f}, "
                  f"strongest AUC {r['final']['baseline_strongest_auc']:.3f}",
                  f"- the original model: held-out forget loss {r['original']['losses']['forget']:.3f}", ""]
        if len(r.get("rates", [])) > 1:  # every rate of the sweep; the worst one leads (and is plotted)
            said = lambda k: "never" if k is None else str(k)  # noqa: E731
            lines += [f"| lr | steps to relearn | {r['baseline']}: steps | fails |", "|---|---|---|---|",
                      *[f"| {x['lr']:g}{' (worst)' if x['lr'] == r['lr'] else ''} | "
                        f"{said(x['model_steps_to_relearn'])} | {said(x['baseline_steps_to_relearn'])} | "
                        f"{'yes' if x['failed'] else 'no'} |" for x in r["rates"]], ""]
        path = plot_relearning(r, run_dir / "plots" / "relearn.png",
                               baseline_label="twin (held-out forget)" if twin else "original (approximate)")
        lines += [f"![relearning]({path.relative_to(run_dir)})", ""]
    q = audits.get("quantize")
    if q:
        has_twin = q["twin"] is not None
        groups = quantization_groups_line(q.get("groups"), q["group_size"])
        if has_twin and q.get("twin_groups") and q["twin_groups"] != q.get("groups"):
            groups += f" (the twin: {quantization_groups_line(q['twin_groups'], q['group_size'])})"
        lines += [f"### Quantization: {audit_status(q)}", "", f"- {q['scheme']}", f"- {groups}", f"- {q['finding']}",
                  "",
                  "| weights | forget loss | Δ | strongest AUC | Δ | unseen-like ≤ |" +
                  (" twin forget loss | Δ | twin strongest AUC | Δ |" if has_twin else ""),
                  "|---|---|---|---|---|---|" + ("---|---|---|---|" if has_twin else "")]
        for row in q["rows"]:
            label = "full precision" if row["bits"] == "full" else f"{row['bits']}-bit"
            line = (f"| {label} | {row['losses']['forget']:.3f} | {row['loss_change']['forget']:+.3f} | "
                    f"{row['strongest_auc']:.3f} | {row['auc_change']:+.3f} | {row['unseen_like_high']:.3f} |")
            if has_twin:
                line += (f" {row['twin_losses']['forget']:.3f} | {row['twin_loss_change']['forget']:+.3f} | "
                         f"{row['twin_strongest_auc']:.3f} | {row['twin_auc_change']:+.3f} |")
            lines.append(line)
        lines.append("")
    return lines


def earlier_requests_section(after: dict, before: Optional[dict], chain: Optional[dict]) -> list[str]:
    """Did this removal request bring back an earlier one? Each earlier request's forget set (``forget@k``), before
    and after this request: loss, and the strongest attack (members = that set, non-members = the approximate set)."""
    earlier = after.get("earlier") or {}
    if not earlier:
        return []
    lines = [f"## Earlier removal requests (this is request {len(chain['requests'])} of the chain, `chain.json`)"
             if chain else "## Earlier removal requests", "",
             "| forget set | loss before | loss after | strongest attack before | AUC before | strongest attack after | "
             "AUC after |", "|---|---|---|---|---|---|---|"]
    for name, now in earlier.items():
        was = (before or {}).get("earlier", {}).get(name, {})
        loss_before = (before or {}).get("splits", {}).get(name, {}).get("loss")
        lines.append(f"| {name} | {_fmt(loss_before)} | {_fmt(after['splits'][name]['loss'])} | "
                     f"{was.get('strongest_attack', '–')} | {_fmt(was.get('strongest_auc'))} | "
                     f"{now['strongest_attack']} | {_fmt(now['strongest_auc'])} |")
    return lines + [""]
