#!/usr/bin/env bash
# Several nodes with c10d rendezvous. Run the same line on every node:
#   NNODES=4 NPROC_PER_NODE=8 RDZV_HOST=node0.example JOB_ID=exp42 launch/torchrun_multinode.sh sync=gtc
# RDZV_HOST is any node all others can reach (usually the first). Every rank
# writes into one run directory named after JOB_ID: put it on a shared file
# system, or pass hydra.run.dir=/shared/path explicitly.
set -euo pipefail
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST}"
exec torchrun \
  --nnodes "$NNODES" --nproc-per-node "${NPROC_PER_NODE:-1}" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv-id "${JOB_ID:-disttrain}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m disttrain.train "$@"
