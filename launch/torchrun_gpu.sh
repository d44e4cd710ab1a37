#!/usr/bin/env bash
# One worker per GPU on this node (NCCL).   launch/torchrun_gpu.sh [NGPUS] sync=bmuf ...
# Each worker takes the GPU numbered by its LOCAL_RANK (comm.device=cuda).
set -euo pipefail
ngpus="${1:-$(nvidia-smi -L | wc -l)}"; shift || true
exec torchrun --standalone --nproc-per-node "$ngpus" -m disttrain.train comm.device=cuda "$@"
