#!/usr/bin/env bash
# Live membership across hosts (membership=live): one torchrun agent per host, one worker each. A host that is lost
# leaves the run: the other workers agree on who is left and go on from their replicas; no agent restarts its
# worker, nothing is reloaded (docs/guide.md: live membership).
#   On every host:  RDZV_HOST=<host 0's address> recipes/live_torchrun.sh [overrides]
# - Host 0's agent holds the rendezvous store, which the workers' membership agreement uses: it must stay.
# - Start every host before the rendezvous closes (LAST_CALL_S after MIN_NODES have come), and do not start an agent
#   later: torchrun restarts every worker when a new agent arrives, throwing the live replicas away (ckpt_path=last
#   makes such a restart at least resume from the newest checkpoint). A replacement host joins without an agent,
#   `python -m lightning_dpgan fit devices=1 membership=live ckpt_path=join` with the workers' store address
#   (docs/guide.md: joining); joins are tested in runs started by hand, not yet in one started by this recipe.
# - At the end, the agents of the hosts that stayed wait at torchrun's exit barrier for the lost one, up to 300 s
#   (not settable from torchrun's command line), then exit 0; the run's files are complete before that.
set -euo pipefail
: "${RDZV_HOST:?set RDZV_HOST (the address of the host that holds the rendezvous)}"
MIN_NODES=${MIN_NODES:-2}
MAX_NODES=${MAX_NODES:-4}
RUN_DIR=${RUN_DIR:-runs/live}
exec torchrun --nnodes="$MIN_NODES:$MAX_NODES" --nproc-per-node=1 --max-restarts=0 \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv-id="${RDZV_ID:-lightning-dpgan-live}" \
  --rdzv-conf="last_call_timeout=${LAST_CALL_S:-5}" \
  -m lightning_dpgan fit devices=1 membership=live hydra.run.dir="$RUN_DIR" ckpt_path=last "$@"
