"""The ``--dry-run`` memory plan (``dsunlearn/memory.py``) against measured peaks of real CPU runs.

    python benchmarks/bench_memory_plan.py                              # 2 model sizes x (engine, cache), 1 CPU rank
    python benchmarks/bench_memory_plan.py --sizes 1024x8 --modes engine --ranks 2
    python benchmarks/bench_memory_plan.py --gpu --sizes 2048x16                   # GPU ranks, bf16 zero3.json
    python benchmarks/bench_memory_plan.py --eval 64 --audit 2 --modes adapters_off   # the relearning audit too

Each (model size, ``reference.mode``) is one ``deepspeed`` launch of this script with ``--worker``: a real
``loop.unlearn`` GA+KL run (ZeRO-3 fp32, ``ds_configs/zero3_cpu_test.json``, no evaluation, no export) in fresh
processes. Every rank measures its resident memory above its own baseline (after imports and the process group, before
any model is read). The kernel's high-water mark (``VmHWM``) is reset (``/proc/self/clear_refs``) at each phase
boundary, so each phase has its own peak: building the trained engine, building theta_0 (a second engine, or the cache
pass), the forward and backward of every micro-step, and every optimizer step; with ``--audit`` also the relearning
audit's fine-tune (its forward, backward and optimizer steps) and its evaluations after every step. glibc is told to return every freed block above 1 MiB to the kernel at once
(``MALLOC_MMAP_THRESHOLD_``): resident memory then follows the live tensors, which is what the plan predicts and what
``torch.cuda.max_memory_allocated`` measures on a GPU; without it RSS also holds freed heap memory the allocator kept.

The plan for the same config comes from ``dsunlearn unlearn --dry-run`` (the JSON's ``memory_plan``), computed
before anything runs. Output: a markdown table of plan / measured per phase, and the ratio of the peaks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference_memory import build_world, launch_workers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ZERO = REPO / "ds_configs" / "zero3_cpu_test.json"
ZERO_GPU = REPO / "ds_configs" / "zero3.json"
MIB = 2**20


def memory_bytes() -> dict:
    """Current and peak resident memory of this process (``/proc/self/status``), in bytes; on a GPU also the CUDA
    caching allocator's allocated bytes and their peak (``torch.cuda.max_memory_allocated``)."""
    import torch
    out = {}
    if torch.cuda.is_available():
        out["cuda"], out["cuda_peak"] = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Start a new high-water mark: VmHWM := VmRSS (Linux >= 4.0, ``man 5 proc``, clear_refs value 5)."""
    Path("/proc/self/clear_refs").write_text("5")
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def record(marks: dict, part: str) -> None:
    """The peak since the last reset into ``marks["parts"]`` (max over calls), then a new high-water mark."""
    peaks, now = marks.setdefault("parts", {}), memory_bytes()
    for key in ("VmHWM", "cuda_peak"):
        if key in now:
            peaks[f"{part}_{key}"] = max(peaks.get(f"{part}_{key}", 0), now[key])
    reset_peak()


def measure_steps(marks: dict, engine, prefix: str = "") -> None:
    """Each part of a training step gets its own peak: the forward (theta_0's included, and the loss terms, until
    ``engine.backward``), the backward, the optimizer step."""
    for name in ("backward", "step"):
        original = getattr(engine, name)

        def wrapped(*a, _original=original, _name=name, **k):
            if _name == "backward":
                record(marks, prefix + "forward")
            out = _original(*a, **k)
            record(marks, prefix + _name)
            return out
        setattr(engine, name, wrapped)


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one rank of one measured run

def worker(config: str, out_dir: str) -> int:
    import gc
    import torch
    from dsunlearn import engine as E
    from dsunlearn import loop
    from dsunlearn import reference as R
    from dsunlearn.config import load_run_config
    cfg = load_run_config(config)
    E.init_distributed()
    # Code the run imports later and the first matmul's library workspaces are the process's, not the run's memory.
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from dsunlearn import eval as _, memory as _m  # noqa: F401
    torch.ones(64, 64) @ torch.ones(64, 64)
    gc.collect()
    marks = {"baseline": memory_bytes()}
    reset_peak()

    def factory(cfg, ds_config, method, engine, streams, tokenizer):
        marks["engine"] = memory_bytes()
        reset_peak()
        ref = R.build_reference(cfg, ds_config, method, engine, streams, tokenizer)
        marks["reference"] = memory_bytes()
        reset_peak()
        measure_steps(marks, engine)
        return ref

    # Each evaluation (the twin's, before, after) is a phase of its own; the twin's load counts to it.
    from dsunlearn.eval import runner
    evaluate_model = runner.evaluate_model

    def evaluate(*a, **k):
        before = memory_bytes()
        reset_peak()
        out = evaluate_model(*a, **k)
        now = memory_bytes()
        peaks = marks.setdefault("parts", {})
        for key in ("VmHWM", "cuda_peak"):
            if key in now:
                peaks[f"evaluation_{key}"] = max(peaks.get(f"evaluation_{key}", 0), now[key], before[key])
        reset_peak()
        return out
    runner.evaluate_model = evaluate

    # The relearning audit (eval.audits): its fine-tune engine's steps and its evaluations after every step (on that
    # engine) are phases of their own; loading and building its engine, and scoring frozen models, are not measured.
    from dsunlearn.eval import audit
    relearn_curve, audit_evaluate = audit.relearn_curve, audit.evaluate_model
    build_train_engine = E.build_train_engine
    in_curve = []

    def curve(*a, **k):
        def build(*ba, **bk):
            engine = build_train_engine(*ba, **bk)
            measure_steps(marks, engine, prefix="audit_")
            return engine
        E.build_train_engine = build
        in_curve.append(True)
        try:
            return relearn_curve(*a, **k)
        finally:
            E.build_train_engine = build_train_engine
            in_curve.pop()

    def evaluate_audit(*a, **k):
        if not in_curve:
            return audit_evaluate(*a, **k)
        reset_peak()
        out = audit_evaluate(*a, **k)
        record(marks, "audit_evaluation")
        return out
    audit.relearn_curve, audit.evaluate_model = curve, evaluate_audit

    start = time.perf_counter()
    code = loop.unlearn(cfg, str(ZERO_GPU if torch.cuda.is_available() else ZERO), reference_factory=factory)
    marks["train"] = memory_bytes()
    marks["seconds"] = time.perf_counter() - start
    Path(out_dir, f"rank{E.rank()}.json").write_text(json.dumps(marks))
    return code


# ---------------------------------------------------------------------------------------------------------------------
# Driver

def run_config(world: dict, mode: str, run_dir: Path, args) -> dict:
    sections = {"adapter": {"rank": args.lora_rank}} if mode == "adapters_off" else {}
    evaluation = {"splits": ["forget", "approximate"], "micro_batch_size": args.eval, "max_chunks": 8,
                  "retrained_model": world["model"], "split_check": False} if args.eval else {"splits": []}
    if args.audit:  # one chunk per rank and fine-tune step
        evaluation["audits"] = ["relearn"]
        sections["audit"] = {"relearn_steps": args.audit, "relearn_batch_size": args.ranks}
    return sections | {"model": {"path": world["model"]},
            "data": {k: world[k] for k in ("forget", "retain", "approximate")} | {"seq_len": args.seq_len},
            "method": {"name": "ga_kl"}, "reference": {"mode": mode, "topk": args.topk},
            "train": {"micro_batch_size": args.micro_batch_size, "num_steps": args.steps, "lr": 1e-5,
                      "warmup_ratio": 0.0, "activation_checkpointing": args.activation_checkpointing},
            "eval": evaluation, "output": {"run_dir": str(run_dir), "save_model": bool(args.audit)}}


def planned(cfg_path: Path, ranks: int, zero: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "dsunlearn", "unlearn", "--config", str(cfg_path), "--zero", str(zero),
                        "--dry-run", "--world-size", str(ranks)], env=env, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        sys.exit(f"dry run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)["memory_plan"]


def measure(world: dict, mode: str, work: Path, label: str, args) -> tuple[Path, dict]:
    run_dir = work / "runs" / label
    shutil.rmtree(work / "runs", ignore_errors=True)  # the cache too: cache mode builds it inside the measured run
    out = work / "marks" / label
    cfg_path = work / f"{label}.json"
    cfg_path.write_text(json.dumps(run_config(world, mode, run_dir, args), indent=1))
    if not (args.reuse and (out / "rank0.json").is_file()):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        launch_workers(__file__, cfg_path, out, args.ranks, label, gpu=args.gpu,
                       extra_env={"MALLOC_MMAP_THRESHOLD_": str(MIB)})
        shutil.rmtree(work / "runs", ignore_errors=True)
    marks = {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)}
    return cfg_path, marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", default=str(REPO / ".cache" / "bench_memory_plan"))
    ap.add_argument("--sizes", nargs="+", default=["512x4", "1024x8"], help="HIDDENxLAYERS of random Llamas")
    ap.add_argument("--modes", nargs="+", default=["engine", "cache"],
                    help="reference.mode values; adapters_off trains a LoRA adapter of rank --lora-rank")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="GPU ranks, ds_configs/zero3.json (bf16); measured: "
                                                       "torch.cuda.max_memory_allocated above the baseline")
    ap.add_argument("--measure-only", action="store_true", help="run and keep the measurements; no plan, no table")
    ap.add_argument("--eval", type=int, default=0, metavar="CHUNKS",
                    help="evaluate (forget and approximate splits, the model itself as the retrained twin) at this "
                         "eval.micro_batch_size, and compare the evaluation phase too; 0 = no evaluation")
    ap.add_argument("--audit", type=int, default=0, metavar="STEPS",
                    help="with --eval: the relearning audit (eval.audits) of this many fine-tune steps, one chunk per "
                         "rank and step, scored at --eval chunks after every step; compare its two phases too")
    ap.add_argument("--reuse", action="store_true", help="reuse measured marks of an earlier run of the same label")
    args, _ = ap.parse_known_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    if args.worker:
        sys.exit(worker(args.config, args.out))
    if args.audit and not args.eval:
        ap.error("--audit needs --eval (the audit scores the forget and approximate splits)")

    work = Path(args.work_dir)
    rows = []
    for size in args.sizes:
        hidden, layers = (int(v) for v in size.split("x"))
        world = build_world(work / f"world_{size}", hidden, layers, args.vocab, args.seq_len, num_docs=8)
        for mode in args.modes:
            label = (f"{size}_{mode}_r{args.ranks}{'_ac' if args.activation_checkpointing else ''}"
                     f"{f'_eval{args.eval}' if args.eval else ''}{f'_audit{args.audit}' if args.audit else ''}"
                     f"{'_gpu' if args.gpu else ''}")
            cfg_path, marks = measure(world, mode, work, label, args)
            print(f"{label}: measured", file=sys.stderr)
            if not args.measure_only:
                rows.append((world, size, mode, planned(cfg_path, args.ranks, ZERO_GPU if args.gpu else ZERO), marks))
    if args.measure_only:
        return

    command = "python benchmarks/bench_memory_plan.py " + " ".join(sys.argv[1:])
    print(f"\nGA+KL, random Llamas (vocab {args.vocab}, tied embeddings), {args.ranks} {'GPU' if args.gpu else 'CPU'} "
          f"rank(s), ZeRO-3 {'bf16 (' + ZERO_GPU.name if args.gpu else 'fp32 (' + ZERO.name}), {args.micro_batch_size} forget + {args.micro_batch_size} retain chunks of {args.seq_len} "
          f"tokens, top-k {args.topk}, {args.steps} steps, activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'}. Memory above each rank's baseline, max over ranks, "
          f"MiB.\n`{command.strip()}`\n")
    names = ("engine", "reference", "forward/backward", "optimizer step") + (("evaluation",) if args.eval else ()) \
        + (("relearn audit", "relearn audit evaluation") if args.audit else ())
    headers = ("build", "θ0 build") + names[2:]
    print("| model | θ0 | " + "".join(f"{h}: plan / measured | " for h in headers) + "peak: plan / measured | "
          "plan / measured |")
    print("|---|---|" + "---|" * len(names) + "---|---|")
    # A phase the plan names -> the measured parts it covers.
    parts = {"forward/backward": ("forward", "backward"), "optimizer step": ("step",), "evaluation": ("evaluation",),
             "relearn audit": ("audit_forward", "audit_backward", "audit_step"),
             "relearn audit evaluation": ("audit_evaluation",)}
    for world, size, mode, plan, marks in rows:
        def above(phase: str) -> float:
            key, base = ("cuda_peak", "cuda") if args.gpu else ("VmHWM", "VmRSS")
            if phase in parts:
                return max(m["parts"][f"{part}_{key}"] - m["baseline"][base] for m in marks.values()
                           for part in parts[phase]) / MIB
            return max(m[phase][key] - m["baseline"][base] for m in marks.values()) / MIB
        phases = plan["phases"]
        measured = {ph: above(ph) for ph in names}
        peak = max(measured.values())
        cells = [f"{phases[ph] / MIB:.0f} / {measured[ph]:.0f}" for ph in names]
        print(f"| {world['num_params'] / 1e6:.1f}M ({size}) | {mode} | " + " | ".join(cells) +
              f" | {plan['peak_bytes'] / MIB:.0f} / {peak:.0f} | {plan['peak_bytes'] / MIB / peak:.2f} |")


if __name__ == "__main__":
    main()
