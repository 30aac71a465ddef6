"""``dsunlearn demo``: the whole flow on the built-in demo world, in a few minutes on a 2-core CPU machine.

1. Build (or reuse) the demo world: books, papers and code from Debian/PyPI packages, split into forget / retain /
   approximate / general sets, and its tokenizer (``.cache/demo_world``).
2. Take the committed model pair: the original (trained with the forget set) and its exact-retrain twin.
3. Unlearn the original with ``negate_repair``, the shipped method closest to the twin on two model pairs
   (docs/tuning.md, "Methods in phases"; ``dsunlearn/configs/demo.json``): its phases set the forget-specific
   tokens' embedding rows to the mean row, fit and negate a forget task vector, then repair on retain data,
   evaluating every 5 steps; the step closest to the target is exported, and the verdict says whether that is
   forgetting (eval/verdict.py).
4. Audit the exported model (``eval.audits``): does the forgetting survive a 20-step fine-tune on half of the forget
   documents, or 8-/4-bit weights, compared with the twin put through the same (eval/audit.py)?
5. Write the report (markdown + PNG plots): before / after / retrained side by side, the audits first when one fails.

The same flow with your own model and data: ``dsunlearn unlearn --config YOUR.json`` with ``model.path``,
``data.forget/retain/approximate`` (and optionally ``eval.retrained_model``) pointing at your files.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..config import ConfigError, load_run_config
from .pretrain_pair import PRETRAINED_DIR, ensure_world, world_dir

log = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.json"


def demo_overrides(cache_dir: str, pretrained: Path) -> list[str]:
    world = world_dir(cache_dir).resolve()
    return [f"model.path={pretrained / 'original'}",
            f"eval.retrained_model={pretrained / 'retrained'}",
            *(f"data.{name}={world / (name + '.jsonl')}" for name in ("forget", "retain", "approximate", "general"))]


UNLEARN_LR_FRACTION = 0.1
"""The unlearning rate's rule (docs/methods.md, "How the hyperparameters are set"): a tenth of the peak learning rate
the model was last trained at (the demo world's pair: 3e-3 -> the demo config's 3e-4)."""


def pair_overrides(pair_dir: Path) -> tuple[list[str], list[str]]:
    """The demo config pointed at a continued-training pair (``demo/continued_pair.py``): its models, its sets, its
    chunk length, its own run dir; ``train.lr`` by the rule above from the pair's own training rate; the base model
    the pair continued from as ``eval.base_model`` (a user has it); the cost counted against retraining the last
    stage (the twin's tokens). Returns (overrides, warnings)."""
    pair_file = pair_dir / "pair.json"
    if not pair_file.is_file():
        raise ConfigError(f"--pair {pair_dir}: pair.json missing; build one with `python -m "
                          f"dsunlearn.demo.pretrain_pair --base MODEL_DIR --out {pair_dir}`")
    pair = json.loads(pair_file.read_text())
    root = pair_dir.resolve()
    overrides = [f"model.path={root / 'original'}", f"eval.retrained_model={root / 'retrained'}",
                 *(f"data.{name}={root / 'data' / (name + '.jsonl')}" for name in ("forget", "retain", "approximate",
                                                                                    "general")),
                 f"data.seq_len={pair['settings']['seq_len']}",
                 f"train.lr={UNLEARN_LR_FRACTION * pair['settings']['lr']:.6g}",
                 f"cost.pretrain_tokens={pair['models']['retrained']['tokens_seen']}",
                 f"output.run_dir=runs/demo_{pair_dir.name}"]
    base = Path(pair["base"]["path"])
    if (base / "config.json").is_file():
        return overrides + [f"eval.base_model={base}"], []
    return overrides, [f"{pair_file}: the base model {base} is gone; the target is not corrected by its gap"]


def check_pair(manifest: dict, pretrained: Path) -> list[str]:
    """Warnings when the committed pair was trained on other text than this machine's demo world."""
    pair_file = pretrained / "pair.json"
    if not pair_file.is_file():
        return [f"{pair_file} missing: build the pair with `python -m dsunlearn.demo.pretrain_pair`"]
    pair = json.loads(pair_file.read_text())
    here = {k: v["sha256"] for k, v in manifest["sets"].items()}
    differ = sorted(k for k in here if pair["world_sets"].get(k) != here[k])
    if differ:
        return [f"the demo world built here differs from the one the committed models were trained on "
                f"(sets {', '.join(differ)}; trained with Python {pair.get('python')}, this is "
                f"{sys.version.split()[0]}): figures are not comparable; rebuild the pair with "
                f"`python -m dsunlearn.demo.pretrain_pair` (~10 minutes)"]
    return []


def demo_attack_rows(metrics: dict) -> list[tuple[str, list[str]]]:
    """The LOSS attack, the strongest attack (which one, its AUC) and PrivLeak for before / after / retrained."""
    from ..eval.verdict import REFERENCE_ATTACK, extreme_attacks
    cols = [metrics.get(k) for k in ("before", "after", "retrained")]
    loss = [f"{c['mia']['loss']['auc']:.3f}" if c else "-" for c in cols]
    # The twin's own reference attack is calibrated by the twin itself (0.5 by construction): left out for it.
    strongest = [extreme_attacks(c["mia"], exclude=(REFERENCE_ATTACK,) if i == 2 else ())[0] if c else None
                 for i, c in enumerate(cols)]
    names = [s[0].replace("min_k_pp_", "mkpp").replace("min_k_", "mk") if s else "-" for s in strongest]
    aucs = [f"{s[1]:.3f}" if s else "-" for s in strongest]
    leak = [f"{c['distance']['privleak']:+.3f}" if c and "privleak" in c.get("distance", {}) else "-"
            for c in cols]
    return [("LOSS-attack AUC", loss), ("strongest attack", names), ("  its AUC", aucs), ("PrivLeak", leak)]


def demo_memorisation_rows(metrics: dict) -> list[tuple[str, list[str]]]:
    """Forget-set VerbMem (generated) and exact memorisation / extraction strength (teacher-forced), per model."""
    labels = ("before", "after", "retrained")
    scores = (metrics.get("generation") or {}).get("scores", {})
    rows = [("forget VerbMem", [f"{scores[k]['verbmem/forget']:.3f}" if "verbmem/forget" in scores.get(k, {})
                                else "-" for k in labels])]
    for key, name in (("exact_memorisation", "  exact mem."), ("extraction_strength", "  extraction")):
        values = [((metrics.get(k) or {}).get("splits", {}).get("forget") or {}).get(key) for k in labels]
        rows.append((name, [f"{v:.3f}" if v is not None else "-" for v in values]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsunlearn demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=".cache/demo_world", help="demo world cache")
    ap.add_argument("--zero", default=str(Path(__file__).resolve().parents[2] / "ds_configs" / "zero3_cpu_test.json"))
    ap.add_argument("--config", default=str(DEMO_CONFIG),
                    help="the run config (default: the demo's, dsunlearn/configs/demo.json); its model and data are "
                         "the demo world's or --pair's")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--pair", default=None, metavar="DIR",
                    help="a pair built by `python -m dsunlearn.demo.pretrain_pair --base MODEL --out DIR` (e.g. "
                         "SmolLM2-135M): the same unlearning, evaluation and audits on it")
    args = ap.parse_args(argv)
    from ..logs import setup_logging
    from .. import engine as E
    from ..loop import unlearn
    setup_logging()
    if args.pair:
        overrides, warnings = pair_overrides(Path(args.pair))
    else:
        from .sources import FetchError
        try:
            manifest = ensure_world(args.cache_dir)
        except FetchError as e:  # no apt, no package lists, no network: say how to fetch by hand, exit 2
            raise ConfigError(str(e)) from None
        overrides, warnings = demo_overrides(args.cache_dir, PRETRAINED_DIR), check_pair(manifest, PRETRAINED_DIR)
    for w in warnings:
        log.warning(w)
    cfg = load_run_config(args.config, overrides + args.overrides)
    code = unlearn(cfg, args.zero, overwrite=True)
    if E.is_main():
        run_dir = Path(cfg.output.run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        print(f"\n{'mean token loss':<16}{'before':>9}{'after':>9}{'retrained':>11}")
        for split in ("forget", "approximate", "retain", "general"):
            row = [metrics[k]["splits"][split]["loss"] if metrics.get(k) else float("nan")
                   for k in ("before", "after", "retrained")]
            print(f"{split:<16}{row[0]:>9.3f}{row[1]:>9.3f}{row[2]:>11.3f}")
        for label, row in demo_attack_rows(metrics) + demo_memorisation_rows(metrics):
            print(f"{label:<16}" + "".join(f"{v:>{w}}" for v, w in zip(row, (9, 9, 11))))
        print(f"steps: {metrics['steps']} ({metrics['stop_reason'] or 'all planned steps'})")
        print(f"verdict: {metrics['verdict']}")
        from ..eval.report import audit_status
        audits = metrics.get("audits") or {}
        for name in ("relearn", "quantize"):
            if name in audits:
                print(f"{name} audit: {audit_status(audits[name])}: {audits[name]['finding']}")
        for w in warnings:
            print(f"warning: {w}")
        print(f"report: {(run_dir / 'report.md').resolve()}")
    return code
