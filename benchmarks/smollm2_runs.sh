#!/bin/bash
# The SmolLM2-135M pair (issue #25; docs/tuning.md, "On a real pretrained model"): `dsunlearn demo --pair` with each
# method's shipped config, judged against the pair's exact twin of the last stage, with the relearning audit.
#   python -m dsunlearn.demo.pretrain_pair --base models/smollm2-135m --out .cache/smollm2_pair   # cached
#   bash benchmarks/smollm2_runs.sh runs/smollm2 .cache/smollm2_pair [METHOD ...]
#   python benchmarks/phased_table.py --runs runs/smollm2 --label SmolLM2-135M
# Sized for the 2-core CPU machine (~25 min per method): the training budget is 20 steps of 8 chunks, evaluated every
# 10; the relearning audit fine-tunes 20 steps of 4 chunks at the pair's own learning rate only. On a GPU, run the
# shipped configs as they are, with three rates: CPU_SIZE="--set audit.relearn_lr=[1e-5,3e-5,1e-4]" bash ...
# `dsunlearn demo --pair` applies the twin-free rules of docs/methods.md: train.lr a tenth of the pair's own rate
# (fit_lr 10/3 of that), eval.base_model the pair's base (the target's natural gap; the token rows back to the base's).
# The earlier variant (run dir negate_repair_rules: no row edit, before the base model was used):
#   VARIANT=rules EXTRA="--set method.params.token_threshold=1e9" bash benchmarks/smollm2_runs.sh runs/smollm2 \
#     .cache/smollm2_pair negate_repair
set -e
cd "$(dirname "$0")/.."
OUT=$1; PAIR=$(cd "$2" && pwd); shift 2
METHODS=${@:-negate_repair simnpo}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PY:-.venv/bin/python}
LR=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['settings']['lr'])" "$PAIR/pair.json")
CPU_SIZE=${CPU_SIZE-"--set train.micro_batch_size=8 --set train.num_steps=20 --set eval.every_n_steps=10
  --set audit.relearn_batch_size=4 --set audit.relearn_lr=$LR"}
mkdir -p $OUT
for M in $METHODS; do
  case $M in negate_repair) CONFIG=dsunlearn/configs/demo.json;; simnpo) CONFIG=dsunlearn/configs/demo_simnpo.json;;
    *) CONFIG=dsunlearn/configs/$M.json;; esac  # the demo's two (negate_repair now, SimNPO before), else shipped
  NAME=$M${VARIANT:+_$VARIANT}
  $PY -m dsunlearn demo --pair $PAIR --config $CONFIG --set output.run_dir=$OUT/$NAME \
    --set 'eval.audits=["relearn"]' --set audit.relearn_steps=20 $CPU_SIZE $EXTRA > $OUT/$NAME.log 2>&1 \
    || echo "$NAME: exit $?"
done
