"""Test-only entry point: several unlearning runs one after another in ONE launch.

Each launch costs ~15 s of imports and process-group setup on the CPU machines; the runs themselves take a few
seconds. Every run goes through ``dsunlearn.loop.unlearn`` exactly as ``python -m dsunlearn unlearn`` does.

    deepspeed --num_gpus 2 --master_port 29612 tests/dist/multi_unlearn.py --zero ds_configs/zero3_cpu_test.json \
        a.json b.json ...
"""
from __future__ import annotations

import argparse
import logging
import sys


def main() -> int:
    argv = [a for a in sys.argv[1:] if not a.startswith(("--local_rank=", "--local-rank="))]
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", required=True)
    ap.add_argument("configs", nargs="+")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from dsunlearn import loop
    from dsunlearn.config import load_run_config
    codes = [loop.unlearn(load_run_config(path), args.zero) for path in args.configs]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
