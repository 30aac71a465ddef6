#!/usr/bin/env bash
# Launch dsunlearn with Open MPI on one node:   launchers/mpirun.sh NUM_RANKS unlearn --config run.json --zero ds_configs/zero3.json
# Multi-node: add a hostfile, e.g.  MPI_HOSTFILE=launchers/hostfile.example  (slots=N per host) and export MASTER_ADDR
# to the first host's address. dsunlearn maps OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK} to RANK/WORLD_SIZE/LOCAL_RANK
# itself, so DeepSpeed's MPI discovery (which needs mpi4py and picks a non-loopback address) is not used.
set -euo pipefail
NP="${1:?usage: mpirun.sh NUM_RANKS <dsunlearn args>}"; shift
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
export MASTER_PORT="${MASTER_PORT:-29511}"
PYTHON="${PYTHON:-$(command -v python)}"
extra=()
[ -n "${MPI_HOSTFILE:-}" ] && extra+=(--hostfile "$MPI_HOSTFILE")
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
# On one CPU node keep traffic on loopback; on a cluster set MPI_IFACE to the fabric's interface.
exec mpirun -np "$NP" "${extra[@]}" --bind-to none \
  --mca oob_tcp_if_include "${MPI_IFACE:-lo}" --mca btl self,vader,tcp --mca btl_tcp_if_include "${MPI_IFACE:-lo}" \
  -x MASTER_ADDR -x MASTER_PORT -x DS_ACCELERATOR -x OMP_NUM_THREADS -x GLOO_SOCKET_IFNAME -x TORCH_EXTENSIONS_DIR \
  -x HF_HUB_OFFLINE -x HF_DATASETS_OFFLINE -x PATH \
  "$PYTHON" -m dsunlearn "$@"
