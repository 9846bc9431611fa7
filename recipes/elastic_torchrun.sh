#!/usr/bin/env bash
# Elastic training: between MIN_NODES and MAX_NODES hosts, one worker each. When a host is lost, torchrun stops the
# others and starts the group again at the new size (up to RESTARTS times), and `fit` resumes by itself from the
# run's newest checkpoint (ckpt_path=last): every replica exactly when the size is unchanged, from the consensus
# model at another size (the topology rebuilt for it). Give every host the same run directory (a shared disk).
#   On every host:  RDZV_HOST=<host 0's address> recipes/elastic_torchrun.sh [overrides]
# torchrun finds the host that holds the rendezvous, and the address its workers meet at, from the hostname; where a
# host's address is not its hostname's (a network namespace), set LOCAL_ADDR=<this host's address> on every host and
# RDZV_IS_HOST=1 on the rendezvous host (0 on the others).
set -euo pipefail
: "${RDZV_HOST:?set RDZV_HOST (the address of the host that holds the rendezvous)}"
MIN_NODES=${MIN_NODES:-3}
MAX_NODES=${MAX_NODES:-4}
RESTARTS=${RESTARTS:-3}
RUN_DIR=${RUN_DIR:-runs/elastic}
# Workers meet in a store of their own each round (hosted by the new rank 0). The agents' shared rendezvous store
# keeps the previous round's peer addresses under the same keys, and a restarted group can read a dead one.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes="$MIN_NODES:$MAX_NODES" --nproc-per-node=1 --max-restarts="$RESTARTS" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv-id="${RDZV_ID:-lightning-dpgan}" \
  --rdzv-conf="last_call_timeout=${LAST_CALL_S:-5}${RDZV_IS_HOST:+,is_host=$RDZV_IS_HOST}" ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} \
  -m lightning_dpgan fit devices=1 hydra.run.dir="$RUN_DIR" ckpt_path=last \
  checkpoint.every_n_train_steps="${CHECKPOINT_EVERY:-200}" "$@"
