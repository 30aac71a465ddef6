"""Command line: ``dsunlearn <command>`` or ``python -m dsunlearn <command>``.

    python -m dsunlearn unlearn --config run.json --zero ds_configs/zero3.json [--set train.lr=1e-5] [--dry-run]
    deepspeed --num_gpus 8 -m dsunlearn unlearn --config run.json --zero ds_configs/zero3.json
    torchrun --nproc_per_node 2 -m dsunlearn unlearn ...

A mistake the user can fix (bad config, bad data, a non-empty run dir) prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, load_run_config, describe, to_dict

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
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every run-config field with its default")

    p = sub.add_parser("pretrain", help="train a causal LM from scratch with the same engine (the demo world's models)")
    _add_run_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")

    p = sub.add_parser("eval", help="evaluate a model directory: losses, accuracy, membership inference, report")
    _add_run_args(p)
    p.add_argument("--model", required=True, help="Hugging Face model directory to evaluate")
    p.add_argument("--out", required=True, help="where metrics.json, report.md and plots/ are written")

    p = sub.add_parser("demo", help="the built-in demo world end to end: unlearn with GA+GD, evaluate, report",
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

    sub.add_parser("methods", help="list the registered unlearning methods")
    return parser


def _setup_logging() -> None:
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("DeepSpeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    if args.help_config:
        print("\n".join(describe()))
        return 0
    cfg, zero_path = _load_configs(args)
    if args.dry_run:
        return dry_run(cfg, zero_path, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
    code = loop.unlearn(cfg, zero_path, overwrite=args.overwrite, resume=bool(args.resume))
    from . import engine as E
    if E.is_main():
        summary = json.loads((Path(cfg.output.run_dir) / "summary.json").read_text())
        print(f"cost: {loop.cost_line(summary['cost'])}")
        print(f"run directory: {cfg.output.run_dir}")
    return code


def dry_run(cfg, zero_path: str, world_size: int) -> int:
    """Everything a launch would check before the process group exists."""
    from . import engine as E
    from .loop import load_stream, resolve_configs, stream_sources
    from .methods import build_method
    ds_config = resolve_configs(cfg, zero_path, world_size)
    method = build_method(cfg.method)
    E.check_model_dir(cfg)
    tokenizer = E.load_tokenizer(cfg)
    E.check_model_tokenizer(E.load_model_config(cfg), tokenizer, cfg.data.seq_len)
    for name, path in stream_sources(cfg, method.streams).items():
        load_stream(name, path, cfg, tokenizer)
    print(json.dumps({"run_config": to_dict(cfg), "zero_config": ds_config, "world_size": world_size}, indent=2))
    return 0


def cmd_eval(args) -> int:
    from .eval.runner import run_eval
    cfg = load_run_config(args.config, args.overrides)
    metrics = run_eval(cfg, args.zero, args.model, args.out)
    from . import engine as E
    if E.is_main():
        print(json.dumps({"verdict": metrics["verdict"], **metrics["after"]["splits"]}, indent=1))
        print(f"report: {Path(args.out) / 'report.md'}")
    return 0


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


def cmd_methods(args) -> int:
    from .methods import METHODS
    for name, cls in sorted(METHODS.items()):
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {doc}")
    return 0


COMMANDS = {"unlearn": cmd_unlearn, "pretrain": cmd_pretrain, "eval": cmd_eval, "demo": cmd_demo,
            "methods": cmd_methods, "sweep": cmd_sweep}


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
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"dsunlearn: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
