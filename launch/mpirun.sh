#!/usr/bin/env bash
# Launch disttrain training under MPI, on one host or on several with a hostfile.
#
#   launch/mpirun.sh -n 4 [-f HOSTFILE] [--comm mpi|torch] [TRAINING OVERRIDES ...]
#
#   launch/mpirun.sh -n 4 sync=gtc model=mlp                  # one host, MPI collectives
#   launch/mpirun.sh -n 4 --comm torch sync=bmuf              # one host, gloo/NCCL, rendezvous over MPI
#   launch/mpirun.sh -n 16 -f hosts sync=gtc                  # hosts: "node1:4" per line (MPICH)
#   MASTER_ADDR=10.0.0.1 GLOO_SOCKET_IFNAME=eth0 launch/mpirun.sh -n 16 -f hosts --comm torch
#
# comm=mpi needs no rendezvous at all.  comm=torch finds rank 0 through MPI
# (disttrain.comm.mpi.share_master_address): 127.0.0.1 on one host, rank 0's
# resolvable address on several (MASTER_ADDR overrides it; GLOO_SOCKET_IFNAME
# picks the interface gloo uses).
#
# Environment:
#   MPIEXEC           the launcher (default: the mpiexec next to python, i.e. the
#                     mpich wheel's; it must belong to the MPI mpi4py was built for)
#   PYTHON            the interpreter every rank runs (default: python on PATH;
#                     on several hosts it must exist at the same path on each)
#   OMP_NUM_THREADS   torch threads per rank (default on one host: cores / ranks, at least 1)
#   MPIEXEC_ARGS      extra launcher arguments (e.g. "-ppn 2"; Open MPI: "-x MASTER_ADDR")
#
# All ranks write to one run directory, outputs/mpi-<time> unless an override
# sets hydra.run.dir (under mpiexec each rank would otherwise stamp its own).
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

ranks="" hostfile="" comm="mpi"
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|-np) ranks="${2:?-n needs a number of ranks}"; shift 2 ;;
    -f|--hostfile|-hostfile) hostfile="${2:?-f needs a hostfile}"; shift 2 ;;
    --comm) comm="${2:?--comm needs mpi or torch}"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; overrides+=("$@"); break ;;
    *) overrides+=("$1"); shift ;;
  esac
done

[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || { echo "mpirun.sh: -n RANKS is required (a positive integer)" >&2; usage 2; }
[[ "$comm" == mpi || "$comm" == torch ]] || { echo "mpirun.sh: --comm must be mpi or torch, got '$comm'" >&2; exit 2; }
[[ -z "$hostfile" || -r "$hostfile" ]] || { echo "mpirun.sh: cannot read hostfile '$hostfile'" >&2; exit 2; }

PYTHON="${PYTHON:-$(command -v python)}"
MPIEXEC="${MPIEXEC:-$(dirname "$PYTHON")/mpiexec}"
[[ -x "$MPIEXEC" ]] || MPIEXEC="$(command -v mpiexec || true)"
[[ -n "$MPIEXEC" ]] || { echo "mpirun.sh: no mpiexec found: pip install -e '.[mpi]' or set MPIEXEC" >&2; exit 2; }

args=(-n "$ranks")
if [[ -n "$hostfile" ]]; then
  args+=(-f "$hostfile")
elif [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  threads=$(( $(nproc) / ranks ))
  export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

run_dir=()
if ! printf '%s\n' "${overrides[@]+"${overrides[@]}"}" | grep -q '^hydra\.run\.dir='; then
  run_dir=("hydra.run.dir=outputs/mpi-$(date +%Y-%m-%d_%H-%M-%S)")
fi

# shellcheck disable=SC2086  # MPIEXEC_ARGS is a list of words on purpose
exec "$MPIEXEC" "${args[@]}" ${MPIEXEC_ARGS:-} "$PYTHON" -m disttrain.train "comm=$comm" \
  "${run_dir[@]+"${run_dir[@]}"}" "${overrides[@]+"${overrides[@]}"}"
