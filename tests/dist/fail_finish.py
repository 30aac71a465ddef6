"""Test-only entry point: unlearning runs whose finishing parts (``dsunlearn/finish.py``) fail on one rank.

Each run gets one fault: ``PART@RANK`` makes the real callable behind that part raise on that rank right after it
returned (the failing rank's own work after the collective work, e.g. a write); ``write@0`` makes rank 0's write of
``model/`` raise inside ``export_hf_model`` (a full disk). Every run goes through ``loop.unlearn`` as the command
does; the outcome of each (its exception on this rank, and the seconds it took) goes to ``OUT.rank<r>.json``.

    deepspeed --num_gpus 2 tests/dist/fail_finish.py --zero ds_configs/zero3_cpu_test.json --out OUT \
        a.json:cost@1 b.json:export@1 ...
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager


class InjectedFault(RuntimeError):
    pass


def _targets():
    from dsunlearn import chain, engine, finish, loop
    from dsunlearn.eval.runner import Evaluator
    return {"final checkpoint": (finish, "save_checkpoint"), "cost": (loop, "plan_cost"),
            "final evaluation": (Evaluator, "conclude"), "export": (engine, "export_hf_model"),
            "chain record": (chain, "record_result"), "audits": (loop, "run_audits"),
            "generated memorisation metrics": (Evaluator, "generation"),
            "evaluation report": (Evaluator, "finish"), "write": (engine, "replace_dir")}


@contextmanager
def fault(part: str, on_rank: int):
    from dsunlearn import engine as E
    owner, name = _targets()[part]
    real = getattr(owner, name)

    def failing(*args, **kwargs):
        if part == "write" and E.rank() == on_rank:
            raise InjectedFault(f"injected: {part} on rank {on_rank}")
        out = real(*args, **kwargs)
        if E.rank() == on_rank:
            raise InjectedFault(f"injected: {part} on rank {on_rank}")
        return out
    setattr(owner, name, failing)
    try:
        yield
    finally:
        setattr(owner, name, real)


def main() -> int:
    argv = [a for a in sys.argv[1:] if not a.startswith(("--local_rank=", "--local-rank="))]
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("cases", nargs="+", help="CONFIG:PART@RANK")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from dsunlearn import engine as E
    from dsunlearn import loop
    from dsunlearn.config import load_run_config
    outcomes = []
    for case in args.cases:
        path, spec = case.rsplit(":", 1)
        part, rank = spec.rsplit("@", 1)
        start = time.time()
        with fault(part, int(rank)):
            try:
                outcome = {"code": loop.unlearn(load_run_config(path), args.zero)}
            except Exception as e:  # noqa: BLE001 - what the test asserts
                outcome = {"error": type(e).__name__, "message": str(e)}
        outcomes.append({"case": case, "seconds": round(time.time() - start, 1), **outcome})
    with open(f"{args.out}.rank{E.rank()}.json", "w") as f:
        json.dump(outcomes, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
