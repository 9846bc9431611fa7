#!/usr/bin/env bash
# Two hosts × 2 processes, launched by torchrun. Run this on every host with NODE_RANK=0 / 1 and MASTER_ADDR set
# to host 0's address. Lightning sees torchrun's environment and starts no processes of its own; every process
# reads the same Hydra config, so give them one run directory.
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 recipes/multinode_torchrun.sh topology=one_peer_exponential
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK (0 on the master host)}" "${MASTER_ADDR:?set MASTER_ADDR (the master host)}"
NNODES=${NNODES:-2}
NPROC=${NPROC:-2}
RUN_DIR=${RUN_DIR:-runs/multinode}
exec torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
  --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}" \
  -m lightning_dpgan fit devices="$NPROC" num_nodes="$NNODES" hydra.run.dir="$RUN_DIR" "$@"
