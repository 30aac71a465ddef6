"""The demo world's model pair: the original (corpus + forget set, repeated) and its exact-retrain twin (no forget set).

Both are trained from scratch by ``dsunlearn pretrain`` (the same engine and loop as unlearning, ZeRO-3, fp32, one
CPU rank each, run side by side), deterministic from the seed. Training both takes ~8 minutes on a 2-core machine,
which does not fit ``make demo``'s budget, so the pair is committed under ``dsunlearn/demo/pretrained/`` and this is
the one command that rebuilds it bit for bit (same Python version, same Debian packages: see pair.json):

    python -m dsunlearn.demo.pretrain_pair --cache-dir .cache/demo_world --out dsunlearn/demo/pretrained
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import engine as E
from .continued_pair import PairSettings, build_continued_pair
from .world import build_world

PACKAGE_DIR = Path(__file__).resolve().parent
PRETRAINED_DIR = PACKAGE_DIR / "pretrained"
ZERO_CPU = PACKAGE_DIR.parents[1] / "ds_configs" / "zero3_cpu_test.json"

# Llama, hidden 128, 4 layers, 2 heads, MLP 352, tied embeddings, 8k vocabulary: ~1.85 M parameters.
ARCHITECTURE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
SEQ_LEN = 128
FORGET_REPEATS = 4  # the original sees the forget set this many times per pass over its corpus: memorisation
TRAIN = dict(lr=3e-3, micro_batch_size=16, num_steps=700, warmup_ratio=0.03, schedule="cosine", min_lr_ratio=0.1,
             weight_decay=0.0, grad_clip=1.0, seed=0)


def world_dir(cache_dir: str) -> Path:
    return Path(cache_dir) / "world"


def ensure_world(cache_dir: str, seed: int = 0) -> dict:
    """Build (or reuse) the demo world's sets and tokenizer; returns its manifest."""
    out = world_dir(cache_dir)
    if not (out / "manifest.json").is_file():
        build_world(cache_dir, out, seed=seed)
    return json.loads((out / "manifest.json").read_text())


def write_architecture(tokenizer_dir: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **ARCHITECTURE)
    config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def write_corpora(world: Path, work: Path) -> dict[str, Path]:
    """train_original = retain + forget x FORGET_REPEATS; train_retrained = retain only."""
    retain = (world / "retain.jsonl").read_text(encoding="utf-8")
    forget = (world / "forget.jsonl").read_text(encoding="utf-8")
    paths = {"original": work / "train_original.jsonl", "retrained": work / "train_retrained.jsonl"}
    paths["original"].write_text(retain + forget * FORGET_REPEATS, encoding="utf-8")
    paths["retrained"].write_text(retain, encoding="utf-8")
    return paths


def run_config(arch_dir: Path, corpus: Path, run_dir: Path) -> dict:
    return {"model": {"path": str(arch_dir), "init": "random"},
            "data": {"train": str(corpus), "seq_len": SEQ_LEN},
            "train": TRAIN, "output": {"run_dir": str(run_dir)}}


def build_pair(cache_dir: str, out: str, seed: int = 0) -> dict:
    manifest = ensure_world(cache_dir, seed)
    world = world_dir(cache_dir)
    work = Path(cache_dir) / "pretrain"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    arch = work / "arch"
    write_architecture(world / "tokenizer", arch)
    corpora = write_corpora(world, work)
    env = E.standalone_env(OMP_NUM_THREADS="1")  # the two runs side by side, one core each
    procs, started = {}, time.time()
    for name, corpus in corpora.items():
        cfg_path = work / f"{name}.json"
        cfg_path.write_text(json.dumps(run_config(arch, corpus, work / name), indent=1))
        log = open(work / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "dsunlearn", "pretrain", "--config", str(cfg_path),
                                         "--zero", str(ZERO_CPU)], env=env, stdout=log, stderr=subprocess.STDOUT),
                       log)
    seconds = {}
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"pretraining {name} failed; see {work / (name + '.log')}")
        log.close()
        seconds[name] = time.time() - started
    out_dir = Path(out)
    pair = {"seed": seed, "architecture": ARCHITECTURE, "seq_len": SEQ_LEN, "forget_repeats": FORGET_REPEATS,
            "train": TRAIN, "world_sets": {k: v["sha256"] for k, v in manifest["sets"].items()},
            "world_params": manifest.get("params"), "python": sys.version.split()[0], "models": {}}
    for name in corpora:
        run = work / name
        target = out_dir / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run / "model", target)
        stats = json.loads((run / "data_stats.json").read_text())["train"]
        steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        pair["models"][name] = {"train_tokens_per_epoch": stats["num_tokens"], "steps": len(steps),
                                "tokens_seen": int(sum(r["tokens_per_s"] * r["step_seconds"] for r in steps)),
                                "wall_seconds": round(seconds[name], 1), "final_train_loss": steps[-1]["loss/train"]}
    (out_dir / "pair.json").write_text(json.dumps(pair, indent=2) + "\n")
    return pair


PAIR_FLAGS = ("steps", "train_per_batch", "forget_per_batch", "lr", "seq_len")
"""The ``PairSettings`` fields that ``--base`` runs take as flags (``--train-per-batch`` ...)."""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=".cache/demo_world")
    ap.add_argument("--out", default=str(PRETRAINED_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default=None, metavar="MODEL_DIR",
                    help="continue training this pretrained model instead (e.g. SmolLM2-135M imported with "
                         "`dsunlearn model import-gguf`): the original and its twin of the last stage "
                         "(dsunlearn/demo/continued_pair.py); --out defaults to .cache/smollm2_pair")
    defaults = PairSettings()
    for field in PAIR_FLAGS:
        ap.add_argument("--" + field.replace("_", "-"), type=type(getattr(defaults, field)), default=None,
                        help=f"with --base (default {getattr(defaults, field)})")
    ap.add_argument("--no-eval", action="store_true", help="with --base: skip scoring the models")
    ap.add_argument("--zero", default=str(ZERO_CPU),
                    help="with --base: the ZeRO JSON of both trainings and evaluations (default: the CPU test "
                         "config; on GPUs e.g. ds_configs/zero3.json)")
    args = ap.parse_args(argv)
    if args.base is None:
        print(json.dumps(build_pair(args.cache_dir, args.out, args.seed), indent=2))
        return
    changed = {f: getattr(args, f) for f in PAIR_FLAGS if getattr(args, f) is not None}
    settings = dataclasses.replace(defaults, seed=args.seed, **changed)
    ensure_world(args.cache_dir, 0)
    out = args.out if args.out != str(PRETRAINED_DIR) else ".cache/smollm2_pair"
    pair = build_continued_pair(args.base, world_dir(args.cache_dir), out, settings, Path(args.zero),
                                evaluate=not args.no_eval)
    print(json.dumps(pair, indent=2))


if __name__ == "__main__":
    main()
