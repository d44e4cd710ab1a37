#!/usr/bin/env bash
# N CPU workers on this machine (gloo).   launch/torchrun_cpu.sh 4 sync=gtc train.steps=500
# One thread per worker: N workers on N cores beat N workers fighting over every core.
set -euo pipefail
nproc_per_node="${1:-2}"; shift || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node "$nproc_per_node" -m disttrain.train comm.device=cpu "$@"
