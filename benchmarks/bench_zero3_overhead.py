"""Where a ZeRO-3 unlearning step's time goes: dsunlearn's GA+GD step against a plain DeepSpeed ZeRO-3 training step
(an HF causal LM, ``engine(input_ids, labels)``, plain cross-entropy, backward, step: the step every DeepSpeed-based
peer runs), on the same model, tokens and resolved ZeRO JSON, per step phase. Then the ZeRO-3 knobs, one at a time.

    # 1 and 2 CPU ranks, the issue's shape (10M Llama: hidden 256, 8 layers, the demo tokenizer's 8192 vocabulary;
    # 4 chunks x 256 tokens per step: 2 forget + 2 retain for GA+GD), ~4 min on the 2-core machines
    DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$PWD/.torch_extensions \\
      python benchmarks/bench_zero3_overhead.py [--ranks 1,2] [--steps 12] [--knobs] [--profile]

The two step kinds run in ONE process per rank count, each on its own ZeRO-3 engine built from the same weights, and
take turns step by step (A B B A A B ...) so both see the same machine load. Medians over the timed steps, after
``--warmup`` excluded ones; a step's time is the slowest rank's (barrier before and after). Phases (dsunlearn):
``forward`` (``loop.fused_forward``: concatenation, the engine forward, the split),
``terms`` (the method's loss math), ``log_nll`` (the per-stream NLL logged each step), ``all_reduce`` (the divergence
guard's and the logged scalars'), ``backward``, ``step``, ``rest`` (batches, scalars, the release-memo workaround). Plain: ``forward``
(HF's loss inside), ``backward``, ``step``.

``--knobs``: dsunlearn's step alone with each ZeRO-3 knob changed from ``--zero`` (persistence threshold, prefetch
bucket, max live parameters, reuse distance, overlap_comm), same turn-taking against the unchanged config.
``--profile``: the top operators of one step of each kind (``torch.profiler``), rank 0.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

KNOBS = [  # (label, zero_optimization key, value)
    ("persistence threshold 1e5 (params below it stay whole on every rank)", "stage3_param_persistence_threshold", 100000),
    ("persistence threshold 1e6", "stage3_param_persistence_threshold", 1000000),
    ("prefetch bucket 0 (no prefetch)", "stage3_prefetch_bucket_size", 0),
    ("prefetch bucket 5e7", "stage3_prefetch_bucket_size", 50000000),
    ("max live parameters 1e6", "stage3_max_live_parameters", 1000000),
    ("max reuse distance 0", "stage3_max_reuse_distance", 0),
    ("overlap_comm true", "overlap_comm", True),
]


# ------------------------------------------------------------------------------------------------------------ worker

class PhaseClock:
    """Seconds per named phase within the current step (CPU: no device synchronisation needed; on a GPU the caller
    synchronises before reading)."""

    def __init__(self):
        self.current: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return timed


class TimedMethod:
    """The method, with ``terms`` timed (a frozen dataclass: wrapped, not patched)."""

    def __init__(self, method, clock: PhaseClock):
        self._method, self._clock = method, clock

    def __getattr__(self, name):
        return getattr(self._method, name)

    def terms(self, outputs):
        with self._clock.phase("terms"):
            return self._method.terms(outputs)


def worker(args) -> None:
    import torch
    import deepspeed
    from dsunlearn import engine as E
    from dsunlearn import loop
    from dsunlearn.config import load_run_config
    from dsunlearn.prepare import prepare
    from dsunlearn.zero import resolve_configs

    E.init_distributed()
    world, rank = E.world_size(), E.rank()
    torch.set_num_threads(1)
    cfg = load_run_config(args.config)

    def tool_run(ds_overrides: dict):
        p = prepare(cfg, args.zero, world)
        zo = p.ds_config["zero_optimization"]
        zo.update(ds_overrides)
        run = loop.build_run(p)
        clock = PhaseClock()
        run.method = TimedMethod(run.method, clock)
        # Time what the loop calls, in place (module attributes the loop looks up at call time).
        run.engine.backward = clock.wrap("backward", run.engine.backward)
        run.engine.step = clock.wrap("step", run.engine.step)
        return run, clock

    def plain_run():
        p = prepare(cfg, args.zero, world)
        model, handle = E.load_model(cfg, p.ds_config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=p.ds_config)
        engine.train()
        return engine, handle

    originals = {"fused_forward": loop.fused_forward, "chunk_nll": loop.chunk_nll,
                 "all_reduce_sum": E.all_reduce_sum}

    def tool_step(run, clock, step):
        clock.current = {}
        loop.fused_forward = clock.wrap("forward", originals["fused_forward"])
        loop.chunk_nll = clock.wrap("log_nll", originals["chunk_nll"])
        E.all_reduce_sum = clock.wrap("all_reduce", originals["all_reduce_sum"])
        try:
            E.barrier()
            start = time.perf_counter()
            loop.train_step(run, step)
            E.barrier()
            total = time.perf_counter() - start
        finally:
            loop.fused_forward, loop.chunk_nll = originals["fused_forward"], originals["chunk_nll"]
            E.all_reduce_sum = originals["all_reduce_sum"]
        phases = dict(clock.current)
        phases["rest"] = total - sum(phases.values())
        return total, phases

    def plain_step(engine, batches, step):
        phases = {}
        fused = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "attention_mask", "labels")}
        E.barrier()
        start = time.perf_counter()
        t = time.perf_counter()
        out = engine(input_ids=fused["input_ids"], attention_mask=fused["attention_mask"], labels=fused["labels"],
                     use_cache=False)
        phases["forward"] = time.perf_counter() - t
        t = time.perf_counter()
        engine.backward(out.loss)
        phases["backward"] = time.perf_counter() - t
        t = time.perf_counter()
        engine.step()
        phases["step"] = time.perf_counter() - t
        E.barrier()
        return time.perf_counter() - start, phases

    def batches_for(run, step):
        return [s.batch(run.samplers[n].indices(step, 0, rank), cfg.data.seq_len, run.pad_id)
                for n, s in run.streams.items()]

    def slowest(seconds: float) -> float:
        return max(E.all_gather_objects(seconds))

    results = {}
    if args.mode in ("compare", "profile"):
        run, clock = tool_run({})
        engine, _handle = plain_run()
        times = {"dsunlearn": [], "plain": []}
        phases = {"dsunlearn": [], "plain": []}
        order = ["dsunlearn", "plain"]
        for i in range(args.warmup + args.steps):
            kinds = order if i % 2 == 0 else order[::-1]
            for kind in kinds:
                if kind == "dsunlearn":
                    total, ph = tool_step(run, clock, i)
                else:
                    total, ph = plain_step(engine, batches_for(run, i), i)
                total = slowest(total)
                if i >= args.warmup:
                    times[kind].append(total)
                    phases[kind].append(ph)
        results["compare"] = {k: {"median": statistics.median(v), "all": v,
                                  "phases": {p: statistics.median(x[p] for x in phases[k]) for p in phases[k][0]}}
                              for k, v in times.items()}
        if args.mode == "profile" and rank == 0:
            from torch.profiler import ProfilerActivity, profile
            for kind in ("dsunlearn", "plain"):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    if kind == "dsunlearn":
                        tool_step(run, clock, 10_000)
                    else:
                        plain_step(engine, batches_for(run, 10_000), 10_000)
                results[f"profile_{kind}"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        elif args.mode == "profile":
            for kind in ("dsunlearn", "plain"):
                if kind == "dsunlearn":
                    tool_step(run, clock, 10_000)
                else:
                    plain_step(engine, batches_for(run, 10_000), 10_000)
    if args.mode == "knobs":
        runs = {"as shipped": tool_run({})}
        for label, key, value in KNOBS:
            runs[label] = tool_run({key: value})
        times = {k: [] for k in runs}
        labels = list(runs)
        for i in range(args.warmup + args.steps):
            for label in (labels if i % 2 == 0 else labels[::-1]):
                run, clock = runs[label]
                total = slowest(tool_step(run, clock, i)[0])
                if i >= args.warmup:
                    times[label].append(total)
        results["knobs"] = {k: statistics.median(v) for k, v in times.items()}
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))


# -------------------------------------------------------------------------------------------------------------- main

def build_world(root: Path, hidden: int, layers: int, seq_len: int) -> dict:
    from transformers import AutoTokenizer
    from dsunlearn.toy import SPLITS, generate_documents, make_tiny_llama, write_jsonl
    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(REPO / "dsunlearn" / "demo" / "pretrained" / "original")
    paths = {}
    for i, name in enumerate(SPLITS):
        paths[name] = str(root / f"{name}.jsonl")
        write_jsonl(Path(paths[name]), generate_documents(64, seed=i, words_per_doc=400, vocab_size=3000), name)
    paths["model"] = make_tiny_llama(str(root / "model"), tok, hidden_size=hidden, num_layers=layers,
                                     num_heads=4, seq_len=seq_len)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    ap.add_argument("--mode", default="compare", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--global-chunks", type=int, default=4, help="chunks per step: half forget, half retain")
    ap.add_argument("--zero", default=str(REPO / "ds_configs" / "zero3_cpu_test.json"))
    ap.add_argument("--knobs", action="store_true", help="also the ZeRO-3 knob table (2 ranks)")
    ap.add_argument("--profile", action="store_true", help="also the top operators of one step of each kind")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from helpers import deepspeed_launcher, launch_env
    import torch
    import deepspeed
    root = Path(tempfile.mkdtemp(prefix="bench_z3_"))
    world = build_world(root / "world", args.hidden, args.layers, args.seq_len)
    ranks = [int(r) for r in args.ranks.split(",")]
    modes = ["profile" if args.profile else "compare"] + (["knobs"] if args.knobs else [])
    report = {}
    for mode in modes:
        for r in (ranks if mode != "knobs" else [max(ranks)]):
            per_rank = args.global_chunks // 2 // r
            cfg = {"model": {"path": world["model"]},
                   "data": {"forget": world["forget"], "retain": world["retain"], "seq_len": args.seq_len},
                   "method": {"name": "ga_gd"},
                   "train": {"lr": 1e-5, "micro_batch_size": per_rank, "num_steps": 10_000, "schedule": "constant",
                             "warmup_ratio": 0.0},
                   "eval": {"splits": []}, "output": {"run_dir": str(root / f"unused_{mode}_{r}")}}
            cfg_path = root / f"{mode}_{r}.json"
            cfg_path.write_text(json.dumps(cfg))
            out = root / f"{mode}_{r}.out.json"
            cmd = deepspeed_launcher(r) + [__file__, "--worker", "--mode", mode, "--config", str(cfg_path),
                                           "--out", str(out), "--zero", args.zero, "--steps", str(args.steps),
                                           "--warmup", str(args.warmup)]
            p = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                sys.exit(p.stdout[-3000:] + p.stderr[-3000:])
            report[(mode, r)] = json.loads(out.read_text())

    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        world["model"]).parameters())
    print(f"# ZeRO-3 step: dsunlearn vs plain DeepSpeed, {datetime.date.today()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"command: python benchmarks/bench_zero3_overhead.py --ranks {args.ranks} --steps {args.steps} "
          f"--warmup {args.warmup} --hidden {args.hidden} --layers {args.layers} --seq-len {args.seq_len} "
          f"--global-chunks {args.global_chunks} --zero {os.path.relpath(args.zero, REPO)}"
          + (" --knobs" if args.knobs else "") + (" --profile" if args.profile else ""))
    print(f"model: Llama {params:,} params; {args.global_chunks} chunks x {args.seq_len} tokens per step "
          f"(GA+GD: half forget, half retain; plain: the same chunks, cross-entropy)\n")
    print("| ranks | plain DeepSpeed s/step | dsunlearn s/step | ratio | dsunlearn phases (median s) | plain phases |")
    print("|---|---|---|---|---|---|")
    for (mode, r), res in report.items():
        if mode == "knobs":
            continue
        c = res["compare"]
        ph = lambda k: ", ".join(f"{n} {v:.3f}" for n, v in c[k]["phases"].items())  # noqa: E731
        print(f"| {r} | {c['plain']['median']:.3f} | {c['dsunlearn']['median']:.3f} | "
              f"{c['dsunlearn']['median'] / c['plain']['median']:.3f} | {ph('dsunlearn')} | {ph('plain')} |")
        for kind in ("dsunlearn", "plain"):
            if f"profile_{kind}" in res:
                print(f"\n{r} rank(s), {kind}, top operators of one step:\n```\n{res[f'profile_{kind}']}\n```")
    for (mode, r), res in report.items():
        if mode != "knobs":
            continue
        base = res["knobs"]["as shipped"]
        print(f"\n{r} ranks, dsunlearn GA+GD step, one ZeRO-3 knob changed from {os.path.relpath(args.zero, REPO)}:\n")
        print("| knob | s/step (median) | vs as shipped |\n|---|---|---|")
        for label, sec in res["knobs"].items():
            print(f"| {label} | {sec:.3f} | {sec / base:.3f} |")


if __name__ == "__main__":
    main()
