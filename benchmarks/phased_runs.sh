#!/bin/bash
# The methods in phases (and the demo's SimNPO for comparison) on one model pair of the demo world, each with its
# shipped config unchanged, judged against the pair's retrained twin, with the relearning audit over three fine-tune
# learning rates (the worst decides). docs/tuning.md, "Methods in phases".
#   bash benchmarks/phased_runs.sh OUT PAIR_DIR WORLD_DIR [METHOD ...]
#   bash benchmarks/phased_runs.sh runs/phased0 dsunlearn/demo/pretrained .cache/demo_world/world      # committed pair
#   python -m dsunlearn.demo.pretrain_pair --seed 1 --cache-dir .cache/demo_world_s1 --out .cache/pair_s1  # ~10 min
#   bash benchmarks/phased_runs.sh runs/phased1 .cache/pair_s1 .cache/demo_world_s1/world                # seed-1 pair
# then: python benchmarks/phased_table.py --runs runs/phased0 --label committed --runs runs/phased1 --label seed-1 \
#   --plot docs/img/phased_pareto.png
# EXTRA: more --set arguments for every run; VARIANT: a suffix of the run names (runs OUT/METHOD_VARIANT), e.g.
#   VARIANT=keep EXTRA="--set method.params.keep_off_negation=true" bash benchmarks/phased_runs.sh ... negate_repair
set -e
cd "$(dirname "$0")/.."
OUT=$1; PAIR=$(cd "$2" && pwd); WORLD=$(cd "$3" && pwd); shift 3
METHODS=${@:-simnpo negate_repair task_vector token_rows undo}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PY:-.venv/bin/python}
TOKENS=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['models']['retrained']['tokens_seen'])" "$PAIR/pair.json")
for M in $METHODS; do
  CONFIG=dsunlearn/configs/$M.json; [ "$M" = simnpo ] && CONFIG=dsunlearn/configs/demo_simnpo.json
  $PY -m dsunlearn unlearn --config $CONFIG --zero ds_configs/zero3_cpu_test.json --overwrite \
    --set output.run_dir=$OUT/$M${VARIANT:+_$VARIANT} --set model.path=$PAIR/original --set eval.retrained_model=$PAIR/retrained \
    --set data.forget=$WORLD/forget.jsonl --set data.retain=$WORLD/retain.jsonl \
    --set data.approximate=$WORLD/approximate.jsonl --set data.general=$WORLD/general.jsonl \
    --set cost.pretrain_tokens=$TOKENS --set eval.max_chunks=64 --set 'eval.audits=["relearn"]' \
    --set audit.relearn_steps=20 --set 'audit.relearn_lr=[1e-4, 3e-4, 1e-3]' $EXTRA \
    > $OUT.$M${VARIANT:+_$VARIANT}.log 2>&1 || echo "$M: exit $?"
done
