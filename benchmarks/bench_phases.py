"""Each phase of a phased method: wall time, peak memory and the boundary's size, at 1 and 2 CPU ranks (ZeRO-3).

    python benchmarks/bench_phases.py                         # negate_repair on the demo pair, 1 and 2 ranks
    python benchmarks/bench_phases.py --method undo --ranks 2
    python benchmarks/bench_phases.py --set method.params.keep_off_negation=false   # any --set of the run config

One real run per world size (``python -m dsunlearn unlearn``, or the ``deepspeed`` launcher for 2 ranks) of the
shipped config with evaluation and audits off (the phases alone), ``MALLOC_MMAP_THRESHOLD_`` set so that resident
memory follows the live tensors (as in ``bench_memory_plan.py``). Every phase's ``phase.json`` gives its seconds and
rank 0's peak resident memory (the kernel's high-water mark, reset at each phase boundary); the last phase's come from
``summary.json``. The boundary is the safetensors model directory a phase leaves (what a resume starts the next phase
from). Needs the demo world (``make demo`` builds it). Output: a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / ".cache" / "demo_world" / "world"


def run(method: str, ranks: int, out: Path, extra: tuple = ()) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", MALLOC_MMAP_THRESHOLD_=str(1 << 20),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--module"] \
        if ranks > 1 else [sys.executable, "-m"]
    sets = [f"output.run_dir={out}", "eval.splits=[]", "eval.audits=[]", "eval.every_n_steps=0", "eval.stop_tolerance=0",
            *(f"data.{n}={WORLD / (n + '.jsonl')}" for n in ("forget", "retain", "approximate", "general")), *extra]
    if ranks > 1:  # the same global batch at every world size
        cfg = json.loads((REPO / "dsunlearn" / "configs" / f"{method}.json").read_text())
        sets.append(f"train.micro_batch_size={cfg['train']['micro_batch_size'] // ranks}")
    cmd = launcher + ["dsunlearn", "unlearn", "--config", str(REPO / "dsunlearn" / "configs" / f"{method}.json"),
                      "--zero", str(REPO / "ds_configs" / "zero3_cpu_test.json"), "--overwrite",
                      *[w for s in sets for w in ("--set", s)]]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stderr[-3000:])


def rows(out: Path) -> list[dict]:
    found = []
    for d in sorted((out / "phases").iterdir()):
        r = json.loads((d / "phase.json").read_text())
        found.append({"phase": r["phase"], "kind": r["kind"], "seconds": r["seconds"],
                      "peak": r["peak_memory_bytes"], "boundary": r["boundary_bytes"], "flops": r["flops"]})
    summary = json.loads((out / "summary.json").read_text())
    cost = summary["cost"]
    found.append({"phase": "last (the run's own)", "kind": "train", "seconds": summary["train_seconds"],
                  "peak": summary["peak_memory_bytes"],
                  "boundary": sum(f.stat().st_size for f in (out / "model").iterdir()),
                  "flops": cost["unlearning_flops"] - sum(p["flops"] for p in cost["phases"])})
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="negate_repair")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run-config override")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in [int(r) for r in args.ranks.split(",")]:
            out = Path(tmp) / f"r{ranks}"
            run(args.method, ranks, out, tuple(args.set))
            results[ranks] = rows(out)
    mib = lambda b: f"{b / 2**20:.0f}" if b is not None else "–"  # noqa: E731
    head = " | ".join(f"{r} rank{'s' if r > 1 else ''}: s, peak MiB" for r in results)
    print(f"| phase | kind | {head} | boundary MiB | FLOPs |")
    print("|---|---|" + "---|" * len(results) + "---|---|")
    first = next(iter(results.values()))
    for i, row in enumerate(first):
        cells = " | ".join(f"{results[r][i]['seconds']:.1f} s, {mib(results[r][i]['peak'])}" for r in results)
        print(f"| {row['phase']} | {row['kind']} | {cells} | {row['boundary'] / 2**20:.1f} | {row['flops']:.3g} |")
    print("\nthe last phase's seconds: its optimizer steps (summary.json train_seconds); its peak: rank 0's from the "
          "phase's start to the end of the run (export included)")


if __name__ == "__main__":
    main()
