"""Three removal requests one after another on the demo world, against one request with all three sets and the twin
(docs/tuning.md, "Removal requests one after another").

    python benchmarks/chain_demo.py --out runs/chain          # after `make demo`; about 10 minutes on 2 cores

1. The demo forget set is split by document (seeded) into three request files.
2. Request 1 unlearns the committed original with the demo's config (SimNPO, the stop rule) on set 1; request 2 runs
   ``--after`` request 1 on set 2; request 3 ``--after`` request 2 on set 3. Each re-evaluates the earlier sets.
3. One request with all three sets: the same config on the whole forget set.
4. Every model state (the original, after each request, the one-shot result, the twin) is scored on each request's set
   (``dsunlearn eval``), and the chain's final model and the one-shot result on the whole forget set with the twin.
Outputs in OUT: ``chain.md`` (the tables) and ``chain.png`` (every request's forget loss across the chain).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cli(args: list[str], check_codes=(0,)) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "dsunlearn", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode not in check_codes:
        sys.exit(f"dsunlearn {' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}")


def split_forget(forget: Path, out: Path, parts: int, seed: int) -> list[Path]:
    docs = forget.read_text().splitlines()
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    paths = []
    for k in range(parts):
        path = out / f"forget_{k + 1}.jsonl"
        path.write_text("\n".join(docs[i] for i in sorted(order[k::parts])) + "\n")
        paths.append(path)
    return paths


def score(model: str, forget: Path, base: list[str], out: Path) -> dict:
    """``dsunlearn eval`` of ``model`` with ``forget`` as the forget split (cached in ``out``)."""
    if not (out / "metrics.json").is_file():
        cli(["eval", "--model", model, "--out", str(out), *base, "--set", f"data.forget={forget}"])
    return json.loads((out / "metrics.json").read_text())["after"]


def main() -> None:
    from dsunlearn.demo.pretrain_pair import PRETRAINED_DIR
    from dsunlearn.demo.run import DEMO_CONFIG, demo_overrides
    from dsunlearn.eval.verdict import REFERENCE_ATTACK, extreme_attacks
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/chain")
    ap.add_argument("--cache-dir", default=".cache/demo_world", help="the demo world (make demo builds it)")
    ap.add_argument("--zero", default="ds_configs/zero3_cpu_test.json")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = demo_overrides(args.cache_dir, PRETRAINED_DIR) + ["eval.audits=[]"]
    world_forget = next(Path(o.split("=", 1)[1]) for o in overrides if o.startswith("data.forget="))
    parts = split_forget(world_forget, out, args.requests, args.seed)
    base = ["--config", str(DEMO_CONFIG), "--zero", args.zero] + [w for o in overrides for w in ("--set", o)]

    previous = None
    for k, part in enumerate(parts, start=1):
        run = out / f"request_{k}"
        if not (run / "summary.json").is_file():
            cli(["unlearn", *base, "--set", f"data.forget={part}", "--set", f"output.run_dir={run}", "--overwrite",
                 *(["--after", str(previous)] if previous else [])])
        previous = run
    one_shot = out / "one_request"
    if not (one_shot / "summary.json").is_file():
        cli(["unlearn", *base, "--set", f"output.run_dir={one_shot}", "--overwrite"])

    original = str(PRETRAINED_DIR / "original")
    twin = str(PRETRAINED_DIR / "retrained")
    states = {"original": original, **{f"after request {k}": str(out / f"request_{k}" / "model")
                                       for k in range(1, len(parts) + 1)},
              "one request, all sets": str(one_shot / "model"), "twin": twin}
    losses = {state: [score(model, part, base, out / "scores" / f"{i}_{k}")["splits"]["forget"]["loss"]
                      for k, part in enumerate(parts)] for i, (state, model) in enumerate(states.items())}
    whole = {name: score(model, world_forget, base, out / "scores" / f"whole_{name}")
             for name, model in (("chain", states[f"after request {len(parts)}"]),
                                 ("one request", str(one_shot / "model")), ("twin", twin))}

    lines = [f"Forget set split by document into {len(parts)} requests "
             f"({', '.join(str(sum(1 for _ in p.open())) for p in parts)} documents); SimNPO with the demo's config and "
             f"stop rule at every request; θ0 of each request = its start model (SimNPO needs none).", "",
             "Every request's forget loss (mean token NLL) across the chain:", "",
             "| model | " + " | ".join(f"set {k}" for k in range(1, len(parts) + 1)) + " |",
             "|---|" + "---|" * len(parts)]
    lines += [f"| {state} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for state, row in losses.items()]
    lines += ["", "The chain's final model against one request with all sets and the twin, on the whole forget set:", "",
              "| model | forget | retain | approximate | general | strongest attack (AUC) |", "|---|---|---|---|---|---|"]
    for name, result in whole.items():
        (attack, auc), _ = extreme_attacks(result["mia"], exclude=(REFERENCE_ATTACK,))
        cells = [f"{result['splits'][s]['loss']:.3f}" for s in ("forget", "retain", "approximate", "general")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {attack} ({auc:.3f}) |")
    steps = [json.loads((out / f"request_{k}" / "summary.json").read_text())["steps"]
             for k in range(1, len(parts) + 1)]
    lines += ["", f"Steps per request: {', '.join(map(str, steps))}; one request: "
              f"{json.loads((one_shot / 'summary.json').read_text())['steps']}."]
    text = "\n".join(lines) + "\n"
    (out / "chain.md").write_text(text)
    print(text)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    chain_states = ["original"] + [f"after request {k}" for k in range(1, len(parts) + 1)]
    for k in range(len(parts)):
        ax.plot(range(len(chain_states)), [losses[s][k] for s in chain_states], marker="o", color=f"C{k}",
                label=f"set {k + 1} (removed at request {k + 1})")
        ax.axhline(losses["twin"][k], linestyle="--", linewidth=1, color=f"C{k}", alpha=0.6)
    ax.set_xticks(range(len(chain_states)), chain_states)
    ax.set_ylabel("forget loss (dashed: the twin's)")
    ax.set_title("Every request's forget set across the chain")
    ax.legend(fontsize="small")
    fig.savefig(out / "chain.png", dpi=120)
    print(f"plot: {out / 'chain.png'}")


if __name__ == "__main__":
    main()
