"""Demo world: what retraining cost (the twin, really trained here) vs the unlearning run that met the stop rule.

    make demo && python benchmarks/demo_ratio.py [--run runs/demo]

FLOPs are analytic (dsunlearn.cost, every pass counted, padded positions included for both). Both sides are
``train_flops`` of the same shape, so they count the same weights (non-embedding + the logits matrix, attention at the
demo's seq_len): the twin's FLOPs are its real pretraining passes, not the ``6 * N * D`` lower bound.
Seconds are measured: the twin's pretraining wall time from dsunlearn/demo/pretrained/pair.json (built side by side
with the original on a 2-core machine, one core each) and the unlearning run's optimizer-step time and wall time from
its summary.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsunlearn.cost import ModelShape, train_flops
from dsunlearn.demo.pretrain_pair import PRETRAINED_DIR


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    args = ap.parse_args()
    from transformers import AutoConfig
    pair = json.loads((PRETRAINED_DIR / "pair.json").read_text())
    summary = json.loads((Path(args.run) / "summary.json").read_text())
    evaluations = len(json.loads((Path(args.run) / "metrics.json").read_text())["history"])
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(PRETRAINED_DIR / "retrained"))
    t = pair["train"]
    twin = pair["models"]["retrained"]
    twin_positions = twin["steps"] * t["micro_batch_size"] * pair["seq_len"]
    twin_flops = train_flops(shape, twin_positions, pair["seq_len"])
    unlearn_flops = summary["cost"]["unlearning_flops"]
    print(f"| | retrained twin (pretraining) | unlearning (GA+GD, to the stop rule) | ratio |\n|---|---|---|---|")
    print(f"| optimizer steps | {twin['steps']} | {summary['steps']} | {twin['steps'] / summary['steps']:.1f}x |")
    print(f"| FLOPs (analytic) | {twin_flops:.3g} | {unlearn_flops:.3g} | {twin_flops / unlearn_flops:.1f}x |")
    print(f"| seconds (optimizer steps) | {twin['wall_seconds']:.0f} (wall, incl. start-up) | "
          f"{summary['train_seconds']:.0f} | {twin['wall_seconds'] / summary['train_seconds']:.1f}x |")
    print(f"| seconds (whole run, wall) | {twin['wall_seconds']:.0f} | {summary['wall_seconds']:.0f} "
          f"(incl. {evaluations} evaluations + the twin's) | {twin['wall_seconds'] / summary['wall_seconds']:.1f}x |")


if __name__ == "__main__":
    main()
