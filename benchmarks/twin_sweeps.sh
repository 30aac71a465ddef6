#!/bin/bash
# Every method on one model pair of the demo world, judged against that pair's retrained twin (docs/tuning.md,
# "Every method's best point against the twin"). Two sweeps: the nine methods that run with paper defaults on the demo
# models, and RMU with its layer set to the demo model's (its paper layer 7 does not exist in a 4-layer model).
#   bash benchmarks/twin_sweeps.sh OUT PAIR_DIR WORLD_DIR
#   bash benchmarks/twin_sweeps.sh sweeps/pair0 dsunlearn/demo/pretrained .cache/demo_world/world      # committed pair
#   python -m dsunlearn.demo.pretrain_pair --seed 1 --cache-dir .cache/demo_world_s1 --out .cache/pair_s1  # ~8 min
#   bash benchmarks/twin_sweeps.sh sweeps/pair1 .cache/pair_s1 .cache/demo_world_s1/world                # seed-1 pair
# then: python benchmarks/twin_table.py --sweep sweeps/pair0 --label committed --sweep sweeps/pair0_rmu --label \
#   committed --sweep sweeps/pair1 --label seed-1 --sweep sweeps/pair1_rmu --label seed-1 --plot docs/img/twin_pareto.png
set -e
cd "$(dirname "$0")/.."
OUT=$1; PAIR=$(cd "$2" && pwd); WORLD=$(cd "$3" && pwd)
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PY:-.venv/bin/python}
# The twin's pretraining tokens: the FLOPs budget of the comparison (cost.pretrain_tokens).
TOKENS=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['models']['retrained']['tokens_seen'])" "$PAIR/pair.json")
COMMON=(--zero ds_configs/zero3_cpu_test.json --grid train.num_steps=40 --set eval.max_chunks=64 --set cost.pretrain_tokens=$TOKENS --set model.path=$PAIR/original
  --set eval.retrained_model=$PAIR/retrained --set data.forget=$WORLD/forget.jsonl --set data.retain=$WORLD/retain.jsonl
  --set data.approximate=$WORLD/approximate.jsonl --set data.general=$WORLD/general.jsonl)
$PY -m dsunlearn sweep --config dsunlearn/configs/demo_sweep.json --out "$OUT" "${COMMON[@]}" \
  --grid train.lr=1e-4,3e-4,1e-3 --methods ga,random_labels,adversarial_labels,ga_gd,ga_gd:general,ga_kl,ga_kl:general,npo,simnpo
$PY -m dsunlearn sweep --config dsunlearn/configs/demo_sweep.json --out "${OUT}_rmu" "${COMMON[@]}" \
  --grid train.lr=1e-4,3e-4,1e-3 --methods rmu \
  --set method.name=rmu --set 'method.params={"layer": 2}'
# The LoRA version of the best method (docs/tuning.md, "LoRA"): SimNPO with rank-8 adapters on every attention and MLP
# projection; adapters need larger learning rates than full fine-tuning.
$PY -m dsunlearn sweep --config dsunlearn/configs/demo_sweep.json --out "${OUT}_lora" "${COMMON[@]}" --methods simnpo \
  --set adapter.rank=8 --set adapter.alpha=16 --grid train.lr=1e-3,3e-3,1e-2
