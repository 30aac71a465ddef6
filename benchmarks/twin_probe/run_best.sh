#!/bin/bash
# The issue #13 probe's best recipe (Fisher-based selective synaptic dampening, alpha=3, lambda=1) from scratch on the
# demo pair, one thread, about a minute after the Fisher pass. Needs the demo world (`make demo` builds it).
#   bash benchmarks/twin_probe/run_best.sh            # NR=128 for the cheaper retain Fisher
set -e
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_ACCELERATOR=cpu
PY=../../.venv/bin/python
OUT=${PROBE_DIR:-../../.cache/twin_probe}
mkdir -p "$OUT/cache"
[ -f "$OUT/base.pkl" ] || $PY base.py                 # original + twin reference metrics (evaluation only)
rm -f "$OUT/cache/fisher_repro.pt"
FISHER="$OUT/cache/fisher_repro.pt" NR=${NR:-384} SAVE="$OUT/best_ssd" $PY ssd.py 3,1
