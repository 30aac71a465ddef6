#!/bin/bash
# Round 3 of the probe (issue #23; docs/tuning.md "What limits the repair"): the round-2 recipe's rows edit and negation
# (beta 2), then 65 repair steps in each variant, evaluated every 10 steps against the twin. One thread per run,
# ~2 minutes each after the reference evaluation. Needs the pair's world (`make demo` builds the committed one).
#   bash benchmarks/twin_probe/run_repair_frontier.sh                                                 # committed pair
#   PROBE_WORLD=$PWD/.cache/demo_world_s1/world PROBE_PAIR=$PWD/.cache/pair_s1 PROBE_DIR=$PWD/.cache/twin_probe_s1 \
#     bash benchmarks/twin_probe/run_repair_frontier.sh                                               # seed-1 pair
set -e
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_ACCELERATOR=cpu
export PROBE_DIR=${PROBE_DIR:-$(cd ../.. && pwd)/.cache/twin_probe}
PY=../../.venv/bin/python
mkdir -p "$PROBE_DIR/cache"
[ -f "$PROBE_DIR/base.pkl" ] || $PY base.py
COMMON="--emb_alpha 3 --emb_mode mean --tv_steps 5 --tv_lr 1e-3 --tv_bs 16 --tv_beta 2 --steps 65 --br 16 --seed 0
  --eval_at 10,20,30,40,50"
run() { echo "== $1"; $PY recipe.py --name "frontier_$1" $COMMON "${@:2}" | grep -E "eval@|FINAL F"; }
run plain --lr 3e-4
run plain_lr1e-3 --lr 1e-3
run keep_off --lr 3e-4 --project global
run hold --lr 3e-4 --bf 16 --fmode hold
run hold_w0.3 --lr 3e-4 --bf 16 --fmode hold --wf 0.3
run hinge --lr 3e-4 --bf 16 --fmode hinge
run contrast --lr 3e-4 --tv_contrast 1 --steps 60
run kl_original --lr 3e-4 --repair kl
run kl_nll_original --lr 3e-4 --repair kl+nll
run skip_rows --lr 3e-4 --tv_skip_rows 1
