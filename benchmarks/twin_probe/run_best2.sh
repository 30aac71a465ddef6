#!/bin/bash
# The issue #13 probe's second round, best recipe: forget-specific embedding rows (forget rate >= 3 x retain rate) set
# to the mean embedding; task-vector negation (5 AdamW steps of NLL on forget at lr 1e-3, batch 16, then
# theta <- theta0' - BETA (theta_f - theta0')); 65 steps of retain NLL (batch 16, AdamW lr 3e-4, betas .9/.95,
# 3 warm-up steps, cosine to 0.1x, clip 1). Cost 5*48 + 65*48 = 3360 units (1/10 of pretraining). One thread,
# ~1.5 minutes after the reference evaluation. Needs the demo world (`make demo` builds it).
#   BETA=2 SEED=0 bash benchmarks/twin_probe/run_best2.sh
set -e
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_ACCELERATOR=cpu
export PROBE_DIR=${PROBE_DIR:-$(cd ../.. && pwd)/.cache/twin_probe}
PY=../../.venv/bin/python
BETA=${BETA:-2}; SEED=${SEED:-0}
mkdir -p "$PROBE_DIR/cache"
[ -f "$PROBE_DIR/base.pkl" ] || $PY base.py      # original + twin metrics (evaluation reference only)
$PY recipe.py --name best_b${BETA}_s${SEED} --emb_alpha 3 --emb_mode mean --tv_steps 5 --tv_lr 1e-3 --tv_bs 16 \
  --tv_beta $BETA --lr 3e-4 --steps 65 --br 16 --seed $SEED --save "$PROBE_DIR/best_b${BETA}_s${SEED}"
