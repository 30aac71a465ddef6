"""Fused single-forward unlearning step vs the two-pass step, under ZeRO-3: bytes communicated, seconds, memory.

    # the sweep: GA+GD at 3 sizes (2.9M/7.3M/20.8M) x 2 lengths (128/512), GA+KL engine vs cache at the two smaller
    # sizes and T=128; 2 CPU ranks, ~8.5 min on the 2-core machines (benchmarks/RESULTS.md, section 2)
    DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$PWD/.torch_extensions \\
      deepspeed --num_gpus 2 --master_port 29631 benchmarks/bench_fused.py --json .cache/bench_fused/main.json
    # the 7B regime: ZeRO-3's live-parameter budget at 0.15 x the model, as ds_configs/zero3.json gives a 6.7B model
    ... benchmarks/bench_fused.py --seq-lens 128 --no-kl --live-fraction 0.15
    # DeepSpeed 0.19.8's memoised release decisions after no-grad forwards, and the fix
    ... benchmarks/bench_fused.py --sizes 128x4,256x4 --seq-lens 128 --no-kl --nograd-before 2 [--clear-release-cache]
    # a quick look (one size, one length, GA+GD only, ~40 s)
    ... benchmarks/bench_fused.py --sizes 128x4 --seq-lens 128 --no-kl

Every design runs in this one process on the same randomly initialised Llama (each design its own ZeRO-3 engine built
from the same seed, so each has its own optimizer state) and on the same random token batches; the designs take turns
step by step (A B B A A B ...) so that both see the same load from whatever else runs on the machine.

GA+GD (forget + retain streams, 1:1, ``train.micro_batch_size`` chunks of each per rank):
  fused     dsunlearn's own step: ``loop.fused_forward`` (forget and retain concatenated, ONE engine forward), the
            method's ``terms``, the weighted sum, ``engine.backward``, ``engine.step``.
  two_pass  what peers do: one engine forward for forget, another for retain, the same ``terms``, one backward of the
            summed loss, ``engine.step``. It only runs with DeepSpeed's timers off: with ``wall_clock_breakdown`` or
            the flops profiler on, DeepSpeed 0.19 raises "bwd_microstep timer has already been started" at the second
            forward (each engine forward registers its own backward hooks). Both are off here for every design.
GA+KL (``--no-kl`` skips it):
  ref_engine  fused step + the frozen reference as a second ZeRO-3 engine (``engine.build_frozen_engine`` with
              ``zero.reference_config``): one no-grad forward over the retain part per step, full-vocabulary KL.
  ref_cache   fused step + theta_0's top-k log-probs computed once before step 1 by the trained engine itself (what
              ``reference.mode = "cache"`` does); held in memory here (dsunlearn reads them from a memory-mapped file:
              ``seq_len * (8k + 4)`` bytes per chunk, negligible next to a step).

Measured per design, after ``--warmup`` steps that are excluded:
  bytes     DeepSpeed's comms logger (``"comms_logger": {"enabled": true, "prof_all": true}`` in the ZeRO config; its
            dict ``deepspeed.comm.comm.comms_logger.comms_dict`` = {op: {msg_size: [count, latencies, ...]}}), over
            ``--count-steps`` steps. For ``all_gather_into_tensor`` DeepSpeed logs the *input* (this rank's shard);
            we report the gathered output, ``msg_size * world_size``, i.e. the full parameter bytes materialised on
            each rank (NCCL-tests' "size"). For ``reduce_scatter_tensor`` it logs the input, the full gradient bucket,
            reported as is. Bytes on the wire per rank are ``(world - 1) / world`` of both. Rank 0's counts.
  seconds   wall time of one optimizer step (barrier before it; the slowest rank's time), median over ``--steps``
            timed steps, run with the comms logger switched off (it synchronises after every collective and does
            Python work per call, which would tax the design that issues more calls).
  memory    the step's peak RSS above the RSS at its start (``VmHWM`` after resetting it via
            ``/proc/self/clear_refs`` = 5, minus ``VmRSS``), max over ranks, median over the timed steps. glibc is
            told (``mallopt``) to serve every allocation >= 64 KiB with mmap and to trim, so freed tensors leave RSS.
            Persistent state (parameter shards, AdamW moments) is the same for every design and is not in it.
  tokens/s  positions per rank per step (forget + retain, padding would count too) / median seconds per step.

A check that the two GA+GD designs compute the same update: their losses at every step agree (the max difference is
printed). Output: the machine, versions, date and command, then a markdown table; ``--json`` keeps every step.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZERO = REPO / "ds_configs" / "zero3_cpu_test.json"


def _malloc_returns_memory() -> None:
    """Make freed tensors leave RSS, so a step's RSS peak is its own (glibc's dynamic mmap threshold would keep
    blocks of up to 32 MiB in the heap after the first free and hand them to the next step)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD: fixed, which also turns the dynamic adjustment off
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


_malloc_returns_memory()

import torch  # noqa: E402

sys.path.insert(0, str(REPO))
from dsunlearn import engine as E  # noqa: E402
from dsunlearn.config import RunConfig, TrainConfig  # noqa: E402
from dsunlearn.cost import ModelShape, Pass, step_flops  # noqa: E402
from dsunlearn.loop import fused_forward  # noqa: E402
from dsunlearn.methods.base import StreamOutputs  # noqa: E402
from dsunlearn.methods.ga_gd import GradDiff  # noqa: E402
from dsunlearn.methods.ga_kl import GradKL  # noqa: E402
from dsunlearn.reference import EngineReference, reference_outputs  # noqa: E402
from dsunlearn.zero import load_zero_json, reference_config, resolve  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# Memory and communication probes


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _comms():
    import deepspeed.comm.comm as C
    return C.comms_logger


def comm_bytes(world: int) -> dict:
    """Bytes and calls per collective since the last reset (see the module docstring for what "bytes" means)."""
    out = {}
    for op, sizes in _comms().get_raw_data().items():
        scale = world if op.startswith("all_gather") else 1
        out[op] = {"bytes": sum(size * v[0] * scale for size, v in sizes.items()),
                   "calls": sum(v[0] for v in sizes.values())}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Model, data, engines


def llama_config(hidden: int, layers: int, vocab: int, seq_len: int):
    from transformers import LlamaConfig
    heads = max(2, hidden // 64)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=seq_len, tie_word_embeddings=False, use_cache=False)


def build_model(config, seed: int):
    """The same random weights on every rank and for every design (deepspeed.initialize partitions them)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def make_batches(num: int, micro: int, seq_len: int, vocab: int, seed: int, rank: int) -> list[dict]:
    """Random tokens, no padding, each rank its own; labels are the tokens (the loss shifts them)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    out = []
    for _ in range(num):
        step = {}
        for name in ("forget", "retain"):
            ids = torch.randint(0, vocab, (micro, seq_len), generator=g)
            step[name] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        out.append(step)
    return out


def run_config(micro: int, seed: int) -> RunConfig:
    # Small constant LR: ascent on a random model stays finite over the few steps measured.
    return RunConfig(train=TrainConfig(lr=1e-5, schedule="constant", warmup_ratio=0.0, micro_batch_size=micro,
                                       seed=seed))


def ds_config_for(cfg: RunConfig, zero_path: Path, world: int, overrides: list[str]) -> dict:
    ds = resolve(load_zero_json(str(zero_path)), cfg, world, source=str(zero_path))
    for item in overrides:
        key, _, value = item.partition("=")
        ds.setdefault("zero_optimization", {})[key] = json.loads(value)
    # Timers and the profiler stay off: the two-pass design crashes with them on (module docstring).
    ds["wall_clock_breakdown"] = False
    ds.pop("flops_profiler", None)
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    return ds


# ---------------------------------------------------------------------------------------------------------------------
# The designs: one optimizer step each


def weighted_total(method, outputs, weights) -> torch.Tensor:
    terms = method.terms(outputs)
    return sum(weights[k] * v for k, v in terms.items())


def fused_step(engine, method, weights, streams, reference=None) -> float:
    outputs = fused_forward(engine, method, streams, reference)
    total = weighted_total(method, outputs, weights)
    engine.backward(total)
    engine.step()
    return float(total.detach())


def two_pass_step(engine, method, weights, streams) -> float:
    outputs = {}
    for name, s in streams.items():
        out = E.forward(engine, s)
        outputs[name] = StreamOutputs(logits=out.logits, labels=s["labels"].to(out.logits.device),
                                      input_ids=s["input_ids"].to(out.logits.device))
    total = weighted_total(method, outputs, weights)
    engine.backward(total)
    engine.step()
    return float(total.detach())


class PrecomputedReference:
    """theta_0's top-k outputs per step, computed before step 1 (``outputs_for`` is the reference hook's)."""

    def __init__(self, per_step: list):
        self.per_step, self.index = per_step, 0

    def outputs_for(self, streams, device) -> dict:
        return {"retain": self.per_step[self.index]}


def clear_release_cache() -> None:
    """dsunlearn's workaround (engine.forget_zero3_release_decisions), applied by --clear-release-cache."""
    E.forget_zero3_release_decisions()


def no_grad_forwards(engine, batches: list[dict]) -> None:
    if not batches:
        return
    engine.eval()
    with torch.no_grad():
        for b in batches:
            E.forward(engine, b["retain"])
    engine.train()


def build_cache(engine, batches: list[dict], topk: int) -> PrecomputedReference:
    per_step = []
    engine.eval()
    with torch.no_grad():
        for b in batches:
            out = E.forward(engine, b["retain"])
            per_step.append(reference_outputs("logits", out.logits, b["retain"]["labels"], topk=topk))
    engine.train()
    return PrecomputedReference(per_step)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def measure_step(fn, count: bool, world: int) -> dict:
    """One step with the barrier, RSS peak and (when ``count``) the comms logger around it."""
    logger = _comms()
    E.barrier()
    gc.collect()
    logger.reset_data()
    logger.enabled = count
    rss0 = _status_kib("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    loss = fn()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") - rss0
    logger.enabled = False
    rec = {"seconds": seconds, "loss": loss, "peak_rss_delta_kib": peak}
    if count:
        rec["comm"] = comm_bytes(world)
    return rec


def run_cell(designs: dict, num_warmup: int, num_count: int, num_steps: int, world: int) -> dict:
    """Interleave the designs step by step (A B, then B A, ...): warm-up, counted (logger on), timed (logger off)."""
    names = list(designs)
    records = {n: {"warmup": [], "count": [], "timed": []} for n in names}
    phases = [("warmup", num_warmup), ("count", num_count), ("timed", num_steps)]
    step = 0
    for phase, n in phases:
        for _ in range(n):
            order = names if step % 2 == 0 else names[::-1]
            for name in order:
                records[name][phase].append(measure_step(lambda: designs[name](step), phase == "count", world))
            step += 1
    return records


def summarise(records: dict, tokens_per_rank: int, world: int) -> dict:
    """Per design: medians across steps, after taking the slowest rank (time) / largest rank (memory) per step."""
    gathered = E.all_gather_objects(records)  # torch.distributed, not deepspeed.comm: never in the comms log
    out = {}
    for name in records:
        timed = [[g[name]["timed"][i] for g in gathered] for i in range(len(records[name]["timed"]))]
        secs = [max(r["seconds"] for r in per_rank) for per_rank in timed]
        peaks = [max(r["peak_rss_delta_kib"] for r in per_rank) for per_rank in timed]
        counted = [r["comm"] for r in records[name]["count"]]  # rank 0's (ZeRO-3 gathers the same on every rank)

        def per_step(op, field):
            return statistics.median(c.get(op, {}).get(field, 0) for c in counted)

        ops = sorted({op for c in counted for op in c})
        losses = [r["loss"] for phase in ("warmup", "count", "timed") for r in records[name][phase]]
        med = statistics.median(secs)
        out[name] = {
            "seconds_median": med, "seconds": secs, "tokens_per_s_per_rank": tokens_per_rank / med,
            "peak_rss_delta_mib_median": statistics.median(peaks) / 1024,
            "peak_rss_delta_mib": [p / 1024 for p in peaks],
            "all_gather_bytes": per_step("all_gather_into_tensor", "bytes"),
            "all_gather_calls": per_step("all_gather_into_tensor", "calls"),
            "reduce_scatter_bytes": per_step("reduce_scatter_tensor", "bytes"),
            "reduce_scatter_calls": per_step("reduce_scatter_tensor", "calls"),
            "comm_per_op": {op: {"bytes": per_step(op, "bytes"), "calls": per_step(op, "calls")} for op in ops},
            "comm_counted_steps": counted, "losses": losses,
        }
    return out


def paired_ratio(summary: dict, slow: str, fast: str) -> float:
    """Median over timed steps of t(slow) / t(fast), pairs taken from the same round (adjacent in time)."""
    return statistics.median(a / b for a, b in zip(summary[slow]["seconds"], summary[fast]["seconds"]))


def new_engine(config, ds_config, cfg, seed, frozen=False):
    model = build_model(config, seed)
    if frozen:
        return E.build_frozen_engine(model, reference_config(ds_config))
    return E.build_train_engine(model, ds_config, cfg, num_steps=10**6)


def bench_cell(hidden: int, layers: int, seq_len: int, args, world: int, rank: int) -> dict:
    cfg = run_config(args.micro_batch_size, args.seed)
    ds_config = ds_config_for(cfg, Path(args.zero), world, args.zero_set)
    config = llama_config(hidden, layers, args.vocab, seq_len)
    total_steps = args.warmup + args.count_steps + args.steps
    batches = make_batches(total_steps, args.micro_batch_size, seq_len, args.vocab, args.seed, rank)
    tokens_per_rank = 2 * args.micro_batch_size * seq_len
    cell = {"hidden": hidden, "layers": layers, "seq_len": seq_len, "tokens_per_rank_per_step": tokens_per_rank}
    _comms().enabled = False

    gd, gd_w = GradDiff(), {"forget": 1.0, "retain": 1.0}
    rss0 = _status_kib("VmRSS")
    engines = {"fused": new_engine(config, ds_config, cfg, args.seed)}
    cell["engine_rss_mib"] = (_status_kib("VmRSS") - rss0) / 1024  # one trained engine's persistent footprint, rank 0
    engines["two_pass"] = new_engine(config, ds_config, cfg, args.seed)
    for eng in engines.values():  # what a "before" evaluation or a reference/label cache pass does before step 1
        no_grad_forwards(eng, batches[:args.nograd_before])
    shape = ModelShape.from_model(engines["fused"].module)
    cell["num_params"] = shape.num_params
    cell["flops_per_step_per_rank"] = step_flops(shape, seq_len, [Pass("train", tokens_per_rank)])["total"]
    designs = {
        "fused": lambda i: fused_step(engines["fused"], gd, gd_w, batches[i]),
        "two_pass": lambda i: two_pass_step(engines["two_pass"], gd, gd_w, batches[i]),
    }
    if args.clear_release_cache:
        designs = {name: (lambda i, fn=fn: (clear_release_cache(), fn(i))[1]) for name, fn in designs.items()}
    records = run_cell(designs, args.warmup, args.count_steps, args.steps, world)
    cell["ga_gd"] = summarise(records, tokens_per_rank, world)
    la, lb = cell["ga_gd"]["fused"]["losses"], cell["ga_gd"]["two_pass"]["losses"]
    cell["ga_gd_max_loss_diff"] = max(abs(a - b) for a, b in zip(la, lb))
    del engines, designs
    gc.collect()

    if args.kl:
        kl, kl_w = GradKL(), {"forget": 1.0, "retain": 1.0}
        engines = {"ref_engine": new_engine(config, ds_config, cfg, args.seed),
                   "ref_cache": new_engine(config, ds_config, cfg, args.seed)}
        reference = EngineReference(new_engine(config, ds_config, cfg, args.seed, frozen=True), {"retain": "logits"})
        start = time.perf_counter()
        cache = build_cache(engines["ref_cache"], batches, args.topk)  # once, before step 1, by theta_0 itself
        cell["cache_build_seconds"] = time.perf_counter() - start

        def cached(i):
            cache.index = i
            return fused_step(engines["ref_cache"], kl, kl_w, batches[i], cache)

        designs = {"ref_engine": lambda i: fused_step(engines["ref_engine"], kl, kl_w, batches[i], reference),
                   "ref_cache": cached}
        if args.clear_release_cache:
            designs = {name: (lambda i, fn=fn: (clear_release_cache(), fn(i))[1]) for name, fn in designs.items()}
        records = run_cell(designs, args.warmup, args.count_steps, args.steps, world)
        cell["ga_kl"] = summarise(records, tokens_per_rank, world)
        del engines, designs, reference, cache
        gc.collect()
    return cell


# ---------------------------------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
    import deepspeed
    import transformers
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "accelerator": E.accelerator_name(), "world_size": E.world_size(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()}


def command(argv: list[str]) -> str:
    """The launch line (reconstructed: the deepspeed launcher does not hand it to its workers)."""
    args = [a for a in argv if not a.startswith("--local_rank")]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("DS_ACCELERATOR", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")
                   if k in os.environ)
    return f"{env} deepspeed --num_gpus {E.world_size()} benchmarks/bench_fused.py {' '.join(args)}".strip()


def mb(x: float) -> str:
    return f"{x / 1e6:.1f}"


def markdown(cells: list[dict], kl: bool) -> str:
    lines = [
        "GA+GD, fused (F) vs two-pass (2P). s/step: median of the slowest rank; speedup: median over rounds of "
        "t(2P)/t(F); AG = bytes all-gathered per step per rank (gathered size), RS = bytes reduce-scattered per step "
        "per rank; peak = a step's RSS peak above its start, max over ranks.",
        "",
        "| params | T | s/step F | s/step 2P | speedup | tok/s/rank F | tok/s/rank 2P | AG MB F | AG MB 2P | AG F/2P "
        "| AG calls F / 2P | RS MB F | RS MB 2P | peak MiB F | peak MiB 2P | max loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        f, t = c["ga_gd"]["fused"], c["ga_gd"]["two_pass"]
        lines.append(
            f"| {c['num_params'] / 1e6:.1f}M (h{c['hidden']} L{c['layers']}) | {c['seq_len']} "
            f"| {f['seconds_median']:.3f} | {t['seconds_median']:.3f} "
            f"| {paired_ratio(c['ga_gd'], 'two_pass', 'fused'):.2f}x "
            f"| {f['tokens_per_s_per_rank']:.0f} | {t['tokens_per_s_per_rank']:.0f} "
            f"| {mb(f['all_gather_bytes'])} | {mb(t['all_gather_bytes'])} "
            f"| {f['all_gather_bytes'] / t['all_gather_bytes']:.2f} "
            f"| {f['all_gather_calls']:.0f} / {t['all_gather_calls']:.0f} "
            f"| {mb(f['reduce_scatter_bytes'])} | {mb(t['reduce_scatter_bytes'])} "
            f"| {f['peak_rss_delta_mib_median']:.0f} | {t['peak_rss_delta_mib_median']:.0f} "
            f"| {c['ga_gd_max_loss_diff']:.1e} |")
    if kl:
        lines += [
            "",
            "GA+KL, fused step with the reference as a frozen ZeRO-3 engine (E, one no-grad forward of the retain "
            "part, full-vocabulary KL) vs cached top-k reference (C, computed once before step 1; build time not in "
            "s/step).",
            "",
            "| params | T | s/step E | s/step C | speedup C | AG MB E | AG MB C | AG C/E | AG calls E / C | peak MiB E "
            "| peak MiB C | cache build s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cells:
            if "ga_kl" not in c:
                continue
            e, k = c["ga_kl"]["ref_engine"], c["ga_kl"]["ref_cache"]
            lines.append(
                f"| {c['num_params'] / 1e6:.1f}M | {c['seq_len']} | {e['seconds_median']:.3f} "
                f"| {k['seconds_median']:.3f} | {paired_ratio(c['ga_kl'], 'ref_engine', 'ref_cache'):.2f}x "
                f"| {mb(e['all_gather_bytes'])} | {mb(k['all_gather_bytes'])} "
                f"| {k['all_gather_bytes'] / e['all_gather_bytes']:.2f} "
                f"| {e['all_gather_calls']:.0f} / {k['all_gather_calls']:.0f} "
                f"| {e['peak_rss_delta_mib_median']:.0f} | {k['peak_rss_delta_mib_median']:.0f} "
                f"| {c['cache_build_seconds']:.1f} |")
    return "\n".join(lines)


def targets(cells: list[dict]) -> list[str]:
    out = []
    ratios = [c["ga_gd"]["fused"]["all_gather_bytes"] / c["ga_gd"]["two_pass"]["all_gather_bytes"] for c in cells]
    out.append(f"all-gather fused <= 0.5x two-pass at every cell: {'MET' if max(ratios) <= 0.5 else 'NOT MET'} "
               f"(ratios {min(ratios):.2f}-{max(ratios):.2f})")
    speed = [paired_ratio(c["ga_gd"], "two_pass", "fused") for c in cells]
    med = [c["ga_gd"]["two_pass"]["seconds_median"] / c["ga_gd"]["fused"]["seconds_median"] for c in cells]
    out.append(f"fused never slower than two-pass: {'MET' if min(min(speed), min(med)) >= 1.0 else 'NOT MET'} "
               f"(paired speedups {min(speed):.2f}-{max(speed):.2f}x, ratio of medians {min(med):.2f}-{max(med):.2f}x)")
    return out


def fit_copies(cells: list[dict], bytes_per_param: int) -> dict:
    """bytes ~ a * num_params * bytes_per_param (least squares through 0): a = model copies moved per step."""
    out = {}
    for design in ("fused", "two_pass"):
        for key in ("all_gather_bytes", "reduce_scatter_bytes"):
            xs = [c["num_params"] * bytes_per_param for c in cells]
            ys = [c["ga_gd"][design][key] for c in cells]
            out[f"{design}/{key}"] = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="128x4,256x4,512x4", help="hiddenxlayers, comma-separated")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--micro-batch-size", type=int, default=2, help="chunks per stream per rank")
    ap.add_argument("--warmup", type=int, default=2, help="steps per design, excluded")
    ap.add_argument("--count-steps", type=int, default=1, help="steps per design with the comms logger on")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per design (comms logger off)")
    ap.add_argument("--no-kl", dest="kl", action="store_false", help="skip GA+KL reference engine vs cache")
    ap.add_argument("--kl-max-params", type=float, default=1e7,
                    help="run GA+KL only for sizes with at most this many parameters")
    ap.add_argument("--kl-seq-lens", type=int, nargs="+", default=[128], help="run GA+KL only at these lengths")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--zero", default=str(ZERO), help="the ZeRO JSON (fp32 on CPU)")
    ap.add_argument("--zero-set", action="append", default=[], metavar="KEY=JSON",
                    help="override a zero_optimization key, e.g. stage3_max_reuse_distance=0")
    ap.add_argument("--live-fraction", type=float, default=None, metavar="F",
                    help="set stage3_max_live_parameters and stage3_max_reuse_distance to F x the model's parameters "
                         "(0.15 = ds_configs/zero3.json's 1e9 for a 6.7B model: the backward must re-gather most "
                         "layers)")
    ap.add_argument("--nograd-before", type=int, default=0, metavar="N",
                    help="GA+GD: N no-grad eval forwards on each trained engine before step 1, as dsunlearn's "
                         "'before' evaluation and its cache passes do (changes ZeRO-3's later fetch pattern)")
    ap.add_argument("--clear-release-cache", action="store_true",
                    help="clear DeepSpeed's memoised release decisions before every step of every design (see "
                         "clear_release_cache: the fix for what --nograd-before shows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every measurement here (rank 0)")
    ap.add_argument("--markdown", help="write the report here (rank 0)")
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    E.init_distributed()
    world, rank = E.world_size(), E.rank()
    started = datetime.datetime.now(datetime.timezone.utc)
    info = machine()
    cmd = command(sys.argv[1:])
    if rank == 0:
        print(f"# bench_fused {started:%Y-%m-%d %H:%M} UTC\n{json.dumps(info)}\n`{cmd}`", flush=True)
        if not _reset_peak_rss():
            print("warning: /proc/self/clear_refs is not writable: peaks are process high-water marks", flush=True)
    cells = []
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    for hidden, layers in sizes:
        for seq_len in args.seq_lens:
            t0 = time.perf_counter()
            num_params = build_model_params(hidden, layers, args.vocab)
            kl = args.kl and num_params <= args.kl_max_params and seq_len in args.kl_seq_lens
            zero_set = list(args.zero_set)
            if args.live_fraction is not None:
                live = int(args.live_fraction * num_params)
                zero_set += [f"stage3_max_live_parameters={live}", f"stage3_max_reuse_distance={live}"]
            cell_args = argparse.Namespace(**{**vars(args), "kl": kl, "zero_set": zero_set})
            cell = bench_cell(hidden, layers, seq_len, cell_args, world, rank)
            cell["zero_set"] = zero_set
            cell["wall_seconds"] = time.perf_counter() - t0
            cells.append(cell)
            if rank == 0:
                f, t = cell["ga_gd"]["fused"], cell["ga_gd"]["two_pass"]
                print(f"h{hidden} L{layers} T{seq_len} ({cell['num_params'] / 1e6:.1f}M, "
                      f"{cell['wall_seconds']:.0f} s): "
                      f"fused {f['seconds_median']:.3f} s, {mb(f['all_gather_bytes'])} MB AG; two-pass "
                      f"{t['seconds_median']:.3f} s, {mb(t['all_gather_bytes'])} MB AG", flush=True)
    if rank != 0:
        return
    elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    fit = fit_copies(cells, bytes_per_param=4)
    live_note = (f", stage3_max_live_parameters = stage3_max_reuse_distance = {args.live_fraction} x params"
                 if args.live_fraction is not None else "")
    report = "\n".join([
        f"## bench_fused, {started:%Y-%m-%d} ({elapsed / 60:.1f} min)",
        "",
        f"Machine: {info['cpu']}, {info['cpu_count']} CPUs, load average at start {info['load_average'][0]:.1f}; "
        f"{world} ranks ({info['accelerator']}, gloo), OMP_NUM_THREADS={info['omp_num_threads']}; Python "
        f"{info['python']}, torch {info['torch']}, deepspeed {info['deepspeed']}, transformers {info['transformers']}. "
        f"ZeRO-3 fp32 (`{Path(args.zero).relative_to(REPO) if Path(args.zero).is_relative_to(REPO) else args.zero}`"
        f"{', ' + ', '.join(args.zero_set) if args.zero_set else ''}"
        f"{live_note}"
        f"{f'; {args.nograd_before} no-grad forwards on each GA+GD engine before step 1' if args.nograd_before else ''}"
        f"{'; release cache cleared before every GA+GD step' if args.clear_release_cache else ''}"
        f"), random Llama, vocab {args.vocab}, untied, "
        f"micro-batch {args.micro_batch_size} forget + {args.micro_batch_size} retain chunks per rank; "
        f"{args.warmup} warm-up + {args.count_steps} counted + {args.steps} timed steps per design.",
        "",
        f"    {cmd}",
        "",
        markdown(cells, args.kl),
        "",
        *[f"- {line}" for line in targets(cells)],
        "- fit, model copies moved per step (bytes / (4 * params)): "
        + ", ".join(f"{k} {v:.2f}" for k, v in fit.items()),
    ])
    print("\n" + report, flush=True)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"date": started.isoformat(), "command": cmd, "machine": info,
                                               "args": vars(args), "fit_model_copies": fit, "cells": cells},
                                              indent=1) + "\n")


def build_model_params(hidden: int, layers: int, vocab: int) -> int:
    """Parameter count of the benchmark Llama, from its config on the meta device (no memory)."""
    return ModelShape.from_hf_config(llama_config(hidden, layers, vocab, 128)).num_params


if __name__ == "__main__":
    main()
