"""One GPU, one command: seconds per step, TFLOP/s, MFU and peak memory of a ~1B Llama unlearning step, for plain
PyTorch, plain DeepSpeed ZeRO-3, and dsunlearn with ZeRO-2 and ZeRO-3 (GA+GD; GA+KL with a reference engine and with
a cache). At most ~5 minutes on one H200.

    # on the GPU machine (see ../shared/notes/gpu-offline.md for the wheels an offline machine needs)
    python3 benchmarks/bench_gpu_step.py [--steps 6 --warmup 3 --peak-tflops 989]
    # a CPU smoke run of the same code path on a tiny model (what CI-less machines can check)
    DS_ACCELERATOR=cpu python benchmarks/bench_gpu_step.py --tiny

Model: hidden 2048, 22 layers, 32 heads / 4 KV heads, intermediate 5632, the demo tokenizer's 8192 vocabulary,
randomly initialised (nothing is downloaded); 4 forget + 4 retain chunks x 2048 tokens per step, bf16. Every mode runs
in this one process (a world of one), one after another, each on fresh weights, engines released in between.
FLOPs per step are the tool's own (``dsunlearn.cost``: the fused trained pass, plus the reference forward for GA+KL
with an engine); the plain rows count the same 8 chunks as one trained pass. MFU = achieved FLOP/s / ``--peak-tflops``.
Medians over ``--steps`` steps after ``--warmup``; the device is synchronised before every clock read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
            intermediate_size=5632, seq_len=2048, chunks=4)
TOOL_MODES = {  # mode -> (ZeRO config, method, reference mode)
    "zero2_ga_gd": ("zero2", "ga_gd", "cache"), "zero3_ga_gd": ("zero3", "ga_gd", "cache"),
    "zero3_ga_kl_engine": ("zero3", "ga_kl", "engine"), "zero3_ga_kl_cache": ("zero3", "ga_kl", "cache")}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=160, seq_len=64, chunks=2)


def write_model_and_data(root: Path, shape: dict) -> dict:
    """A config.json + tokenizer directory (``model.init: "random"``) and forget/retain JSONL long enough for
    ``4 x steps`` chunks of ``seq_len`` tokens each."""
    from transformers import AutoTokenizer, LlamaConfig
    from dsunlearn.toy import generate_documents, write_jsonl
    tok = AutoTokenizer.from_pretrained(REPO / "dsunlearn" / "demo" / "pretrained" / "original")
    model_dir = root / "model"
    LlamaConfig(vocab_size=len(tok), max_position_embeddings=shape["seq_len"], tie_word_embeddings=False,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                **{k: v for k, v in shape.items() if k not in ("seq_len", "chunks")}).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    paths = {"model": str(model_dir)}
    for i, name in enumerate(("forget", "retain")):
        paths[name] = str(root / f"{name}.jsonl")
        # ~1.7 tokens per pseudo-word: 3 * seq_len words give one full chunk and a tail per document.
        write_jsonl(Path(paths[name]), generate_documents(48, seed=i, words_per_doc=3 * shape["seq_len"] // 2,
                                                          vocab_size=5000), name)
    return paths


def run_config(paths: dict, shape: dict, method: str, reference: str, total_steps: int, root: Path):
    from dsunlearn.config import load_run_config
    cfg = {"model": {"path": paths["model"], "init": "random"},
           "data": {"forget": paths["forget"], "retain": paths["retain"], "seq_len": shape["seq_len"]},
           "method": {"name": method}, "reference": {"mode": reference, "topk": 64},
           "train": {"lr": 1e-5, "micro_batch_size": shape["chunks"], "num_steps": total_steps,
                     "schedule": "constant", "warmup_ratio": 0.0},
           "eval": {"splits": []}, "output": {"run_dir": str(root / "unused")}}
    path = root / f"{method}_{reference}.json"
    path.write_text(json.dumps(cfg))
    return load_run_config(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H200: 989)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model: a smoke run of the code path (CPU)")
    ap.add_argument("--modes", default="torch,deepspeed_zero3,zero2_ga_gd,zero3_ga_gd,zero3_ga_kl_engine,"
                                       "zero3_ga_kl_cache")
    args = ap.parse_args()

    import torch
    import deepspeed
    from dsunlearn import engine as E
    from dsunlearn import loop
    from dsunlearn.cost import ModelShape, run_passes, step_flops, train_flops
    from dsunlearn.data import StreamSampler
    from dsunlearn.prepare import prepare

    shape = TINY if args.tiny else FULL
    root = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    paths = write_model_and_data(root, shape)
    E.init_distributed()
    dev = E.device()
    cuda = dev.type == "cuda"
    total_steps = args.warmup + args.steps
    tokens = 2 * shape["chunks"] * shape["seq_len"]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    baseline = [0]

    def reset_peak():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            baseline[0] = torch.cuda.memory_allocated()  # whatever an earlier mode left is not this mode's

    def peak_gib():
        return (torch.cuda.max_memory_allocated() - baseline[0]) / 2**30 if cuda else float("nan")

    def timed(step_fn) -> float:
        times = []
        for i in range(total_steps):
            sync()
            start = time.perf_counter()
            step_fn(i)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    zero2, zero3 = str(REPO / "ds_configs" / "zero2.json"), str(REPO / "ds_configs" / "zero3.json")
    if not cuda:  # the CPU smoke run: fp32, and the CPU test config (bf16 is emulated and slow there)
        zero2 = zero3 = str(REPO / "ds_configs" / "zero3_cpu_test.json")
    rows = []
    for mode in args.modes.split(","):
        reset_peak()
        if mode in ("torch", "deepspeed_zero3"):
            cfg = run_config(paths, shape, "ga_gd", "cache", total_steps, root)
            p = prepare(cfg, zero3, 1)
            samplers = {n: StreamSampler(num_chunks=st.stats.num_chunks, per_rank=shape["chunks"], grad_accum=1,
                                         world_size=1, seed=k) for k, (n, st) in enumerate(p.streams.items())}
            fused = [{k: torch.cat([st.batch(samplers[n].indices(i, 0, 0), shape["seq_len"], p.tokenizer.pad_token_id)[k]
                                    for n, st in p.streams.items()]).to(dev)
                      for k in ("input_ids", "attention_mask", "labels")} for i in range(total_steps)]
            from transformers import AutoModelForCausalLM
            torch.manual_seed(0)
            if mode == "torch":
                with torch.device(dev):
                    model = AutoModelForCausalLM.from_config(p.model_config, dtype=torch.float32)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
                autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)

                def step(i, model=model, opt=opt, autocast=autocast):
                    with autocast:
                        loss = model(**fused[i], use_cache=False).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            else:
                model, _handle = E.load_model(cfg, p.ds_config)
                engine, *_ = deepspeed.initialize(model=model, config=p.ds_config, optimizer=torch.optim.AdamW(
                    model.parameters(), lr=1e-5))

                def step(i, engine=engine):
                    out = engine(**fused[i], use_cache=False)
                    engine.backward(out.loss)
                    engine.step()
            seconds = timed(step)
            flops = train_flops(ModelShape.from_model(model if mode == "torch" else engine.module), tokens,
                                shape["seq_len"])
            label = "plain PyTorch (fp32 master, bf16 autocast, fused AdamW)" if mode == "torch" else \
                "plain DeepSpeed ZeRO-3 (ds_configs/zero3.json)"
        else:
            stage, method, reference = TOOL_MODES[mode]
            cfg = run_config(paths, shape, method, reference, total_steps, root)
            p = prepare(cfg, zero2 if stage == "zero2" else zero3, 1)
            run = loop.build_run(p)
            run.engine.train()
            seconds = timed(lambda i, run=run: loop.train_step(run, i))
            t = cfg.train
            per_step = {n: p.method.stream_batch_size(n, t) * t.grad_accum * shape["seq_len"] for n in p.streams}
            flops = step_flops(ModelShape.from_model(run.engine.module), shape["seq_len"],
                               run_passes(per_step, tuple(p.method.reference), reference))["total"]
            label = f"dsunlearn ZeRO-{stage[-1]} {method}" + (f" (reference {reference})" if method == "ga_kl" else "")
        rows.append((label, seconds, flops / seconds / 1e12, flops / seconds / 1e12 / args.peak_tflops,
                     peak_gib()))
        model = engine = run = step = opt = autocast = fused = p = None  # noqa: F841 - drop this mode's state
        E.release_engines()
        reset_peak()

    name = torch.cuda.get_device_name() if cuda else "CPU (smoke run)"
    print(f"# GPU step benchmark: {name}, torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    print(f"command: python3 benchmarks/bench_gpu_step.py --steps {args.steps} --warmup {args.warmup} "
          f"--peak-tflops {args.peak_tflops}{' --tiny' if args.tiny else ''}")
    print(f"model: Llama hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
          f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, intermediate "
          f"{shape['intermediate_size']}; {shape['chunks']} forget + {shape['chunks']} retain chunks x "
          f"{shape['seq_len']} tokens per step" + ("" if cuda else "; CPU smoke run: every DeepSpeed row uses "
                                                   "ds_configs/zero3_cpu_test.json, fp32") + "\n")
    base = rows[0][1] if rows and rows[0][0].startswith("plain PyTorch") else None
    print("| step | s / step | TFLOP/s | MFU | vs plain PyTorch | peak GiB |\n|---|---|---|---|---|---|")
    for label, sec, tflops, mfu, peak in rows:
        ratio = f"{sec / base:.2f}x" if base else "–"
        print(f"| {label} | {sec:.3f} | {tflops:.1f} | {100 * mfu:.1f}% | {ratio} | {peak:.1f} |")


if __name__ == "__main__":
    main()
