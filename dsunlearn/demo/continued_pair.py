"""A pair on a real pretrained LLM: the original and its exact-retrain twin of the LAST training stage.

The field's protocol (TOFU's retain model, MUSE's retrained model): both start from the same pretrained weights
(``--base``, e.g. SmolLM2-135M from ``dsunlearn model import-gguf``) and take the same continued training on the demo
world's retain text; the original also sees the forget text, ``forget_per_batch`` chunks mixed into every batch
(``data.forget_per_batch``, ``dsunlearn pretrain``). The train chunks of every step are the same in both runs (each
stream draws its own chunks from its own seed); the builder reads both runs' ``log.jsonl`` and refuses a pair whose
train chunks differ. The twin is exact for this stage and only for it: whatever the base saw in its own pretraining
is in both models.

    python -m dsunlearn.demo.pretrain_pair --base models/smollm2-135m --out .cache/smollm2_pair

Every document is cut into pieces of ``seq_len - 1`` tokens of the base's tokenizer (one chunk each, with the EOS),
so a set is exactly its number of chunks: forget and approximate take the first piece of each of the demo world's 48
documents; the train corpus takes ``steps * train_per_batch`` retain pieces (one epoch; first pieces first, domains
interleaved), and its first 16 per domain are the retain evaluation set (seen by both models). Both models are then
scored with ``dsunlearn eval`` (the base too): the memorisation they show is in ``pair.json`` with every setting and
hash needed to rebuild the pair bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .. import engine as E
from ..config import ConfigError
from ..data import sha256_file
from ..split import write_jsonl
from .world import read_jsonl

DOMAINS = ("books", "code", "papers")


@dataclass(frozen=True)
class PairSettings:
    """What the pair is built from (all of it in pair.json). Defaults: the 2-core CPU setting (docs/demo-world.md)."""
    seq_len: int = 128
    steps: int = 60
    train_per_batch: int = 4
    """Retain chunks per step (both models)."""
    forget_per_batch: int = 1
    """Forget chunks the original adds to every step: the forget set is seen steps * k / 48 times (1.25 at the
    defaults: the smallest setting measured where the original separates, docs/demo-world.md)."""
    lr: float = 1e-4
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    retain_eval_per_domain: int = 16
    seed: int = 0

    @property
    def num_train_chunks(self) -> int:
        return self.steps * self.train_per_batch


def pieces(tokenizer, text: str, length: int) -> list[str]:
    """``text`` cut into consecutive pieces of ``length`` tokens (the last, shorter one dropped), by offsets."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    out = []
    for start in range(0, len(offsets) - length + 1, length):
        out.append(text[offsets[start][0]:offsets[start + length - 1][1]])
    return out


def interleaved(docs: list[dict]) -> list[dict]:
    """Documents in domain round-robin order (books, code, papers, books, ...), each domain in its file order."""
    by_domain = {d: [x for x in docs if x.get("domain") == d] for d in DOMAINS}
    others = [x for x in docs if x.get("domain") not in DOMAINS]
    out = []
    for i in range(max([len(v) for v in by_domain.values()] + [0])):
        out.extend(v[i] for v in by_domain.values() if i < len(v))
    return out + others


def piece_rows(docs: list[dict], tokenizer, length: int, limit: Optional[int] = None,
               first_only: bool = False) -> list[dict]:
    """Rows of one piece each: every document's first piece, then every second piece, ... up to ``limit``."""
    cut = [pieces(tokenizer, d["text"], length) for d in docs]
    rows = []
    for i in range(1 if first_only else max([len(c) for c in cut] + [0])):
        for d, c in zip(docs, cut):
            if i < len(c):
                rows.append({"id": f"{d['id']}#{i}", "domain": d.get("domain"), "text": c[i]})
                if limit is not None and len(rows) == limit:
                    return rows
    return rows


def write_pair_data(world: Path, tokenizer, s: PairSettings, out: Path) -> dict[str, Path]:
    """forget / approximate / general (first pieces), train (one epoch of retain pieces) and retain (a subset)."""
    out.mkdir(parents=True, exist_ok=True)
    length = s.seq_len - 1  # + EOS = one chunk
    sets = {name: piece_rows(interleaved(read_jsonl(world / f"{name}.jsonl")), tokenizer, length, first_only=True)
            for name in ("forget", "approximate", "general")}
    sets["train"] = piece_rows(interleaved(read_jsonl(world / "retain.jsonl")), tokenizer, length,
                               limit=s.num_train_chunks)
    if len(sets["train"]) < s.num_train_chunks:
        raise ConfigError(f"--steps {s.steps} x --train-per-batch {s.train_per_batch}: needs "
                          f"{s.num_train_chunks} retain pieces, the demo world has {len(sets['train'])}")
    by_domain: dict = {}
    for row in sets["train"]:
        by_domain.setdefault(row["domain"], []).append(row)
    sets["retain"] = [r for rows in by_domain.values() for r in rows[:s.retain_eval_per_domain]]
    paths = {}
    for name, rows in sets.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return paths


def pretrain_config(base: Path, data: dict[str, Path], s: PairSettings, run_dir: Path, original: bool) -> dict:
    cfg = {"model": {"path": str(base), "init": "pretrained"},
           "data": {"train": str(data["train"]), "seq_len": s.seq_len, "min_chunk_tokens": 16},
           "train": {"lr": s.lr, "schedule": "cosine", "warmup_ratio": s.warmup_ratio, "min_lr_ratio": s.min_lr_ratio,
                     "micro_batch_size": s.train_per_batch, "num_steps": s.steps, "weight_decay": 0.0,
                     "grad_clip": 1.0, "seed": s.seed},
           "output": {"run_dir": str(run_dir)}}
    if original:
        cfg["data"].update(forget=str(data["forget"]), forget_per_batch=s.forget_per_batch)
    return cfg


def eval_config(base: Path, data: dict[str, Path], s: PairSettings, out: Path, twin: Optional[Path]) -> dict:
    return {"model": {"path": str(base)},
            "data": {name: str(data[name]) for name in ("forget", "retain", "approximate", "general")}
            | {"seq_len": s.seq_len, "min_chunk_tokens": 16},
            "train": {"seed": s.seed},
            "eval": {"micro_batch_size": 8, "retrained_model": str(twin) if twin else None},
            "output": {"run_dir": str(out)}}


def cached(cfg_path: Path, cfg_text: str, model_dir: Path, run_dir: Path) -> bool:
    """A model trained by exactly this config is already in place (the config is written after the copy)."""
    return (cfg_path.is_file() and cfg_path.read_text() == cfg_text and (model_dir / "config.json").is_file()
            and (run_dir / "log.jsonl").is_file())


def run_module(args: list[str], log_path: Path, env: dict) -> float:
    """``python -m dsunlearn ARGS``, output to a log; the seconds it took."""
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, "-m", "dsunlearn", *args], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    if code != 0:
        errors = [line for line in log_path.read_text(errors="replace").splitlines() if "error" in line.lower()]
        raise SystemExit(f"`dsunlearn {args[0]}` failed (exit {code}): {errors[-1] if errors else 'no error line'}; "
                         f"see {log_path}")
    return time.time() - started


def memorisation_summary(metrics: dict, key: str) -> dict:
    """Forget-vs-approximate separation of one model in an eval's metrics.json: losses, gap, attack AUCs."""
    from ..eval.verdict import REFERENCE_ATTACK, extreme_attacks
    m = metrics[key]
    splits = m["splits"]
    # The strongest attack a user has: the reference attack is calibrated by the twin's losses (the twin's own is
    # 0.5 by construction), so it is reported beside, not in, the strongest.
    name, auc = extreme_attacks(m["mia"], exclude=(REFERENCE_ATTACK,))[0]
    ref = m["mia"].get(REFERENCE_ATTACK, {}).get("auc") if key != "retrained" else None
    return {"loss": {k: round(v["loss"], 4) for k, v in splits.items()},
            "forget_gap": round(splits["approximate"]["loss"] - splits["forget"]["loss"], 4),
            "strongest_attack": name, "strongest_auc": round(auc, 4),
            "reference_attack_auc": round(ref, 4) if ref is not None else None,
            "min_k_20_auc": round(m["mia"]["min_k_20"]["auc"], 4) if "min_k_20" in m["mia"] else None,
            "loss_auc": round(m["mia"]["loss"]["auc"], 4)}


def versions() -> dict:
    import deepspeed
    import torch
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__}


def build_continued_pair(base: str, world: Path, out: str, s: PairSettings, zero: Path,
                         evaluate: bool = True) -> dict:
    """Both continued trainings, the check that their train chunks match, the evaluation; returns pair.json."""
    from transformers import AutoTokenizer
    base_dir = Path(base).resolve()
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"--base {base}: not a model directory (config.json missing); import one with "
                          f"`dsunlearn model import-gguf --out {base}`")
    out_dir = Path(out).resolve()
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = write_pair_data(world, tokenizer, s, out_dir / "data")
    env = E.standalone_env(OMP_NUM_THREADS=str(os.cpu_count() or 1))  # one run at a time, every core
    seconds, models, logs = {}, {}, {}
    for name, original in (("original", True), ("retrained", False)):
        cfg_path, target = work / f"{name}.json", out_dir / name
        cfg_text = json.dumps(pretrain_config(base_dir, data, s, work / name, original), indent=1)
        if cached(cfg_path, cfg_text, target, work / name):
            seconds[f"train_{name}"] = "cached"
        else:
            cfg_path.unlink(missing_ok=True)  # written back only once the model is in place
            pending = work / f"{name}.pending.json"
            pending.write_text(cfg_text)
            seconds[f"train_{name}"] = round(run_module(
                ["pretrain", "--config", str(pending), "--zero", str(zero), "--overwrite"],
                work / f"{name}.log", env), 1)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(work / name / "model", target)
            cfg_path.write_text(cfg_text)
        logs[name] = steps = read_jsonl(work / name / "log.jsonl")
        models[name] = {"steps": len(steps), "tokens_seen": int(sum(r["tokens_per_s"] * r["step_seconds"]
                                                                      for r in steps)),
                        "final_train_loss": round(steps[-1]["loss/train"], 4)}
    # The chunk indices each step took, as the runs logged them.
    if [r["chunks"]["train"] for r in logs["original"]] != [r["chunks"]["train"] for r in logs["retrained"]]:
        raise SystemExit("the original's and the twin's train chunks differ: the twin is not exact")
    forget_seen = sum(len(r["chunks"]["forget"]) for r in logs["original"])
    chunks = {k: len(read_jsonl(p)) for k, p in data.items()}  # one piece = one chunk
    pair = {"base": {"path": str(base_dir), "sha256": sha256_file(base_dir / "model.safetensors")
                     if (base_dir / "model.safetensors").is_file() else None},
            "settings": asdict(s), "zero": json.loads(zero.read_text()),
            "sets": {k: {"file": p.name, "chunks": chunks[k], "sha256": sha256_file(p)} for k, p in data.items()},
            "train_chunks_identical": True, "forget_chunks_seen": forget_seen,
            "forget_epochs": round(forget_seen / max(1, chunks["forget"]), 2),
            "models": models, "versions": versions(), "seconds": seconds}
    if evaluate:
        scores = {}
        for name, model, twin in (("base", base_dir, None), ("original", out_dir / "original", out_dir / "retrained")):
            cfg_path = work / f"eval_{name}.json"
            cfg_path.write_text(json.dumps(eval_config(base_dir, data, s, work / f"eval_{name}", twin), indent=1))
            seconds[f"eval_{name}"] = round(run_module(
                ["eval", "--config", str(cfg_path), "--zero", str(zero), "--model", str(model),
                 "--out", str(work / f"eval_{name}")], work / f"eval_{name}.log", env), 1)
            metrics = json.loads((work / f"eval_{name}" / "metrics.json").read_text())
            scores[name] = memorisation_summary(metrics, "after")
            if twin is not None:
                scores["retrained"] = memorisation_summary(metrics, "retrained")
        pair["memorisation"] = scores
    for name in ("original", "retrained"):  # the runs' checkpoints (weights + optimizer states) are not needed
        shutil.rmtree(work / name / "checkpoints", ignore_errors=True)
        (work / f"{name}.pending.json").unlink(missing_ok=True)
    (out_dir / "pair.json").write_text(json.dumps(pair, indent=2) + "\n")
    return pair
