#!/usr/bin/env bash
# One process of a multi-node GPU run under SLURM: srun starts this script
# once per node (--ntasks-per-node=1), and each copy runs
#
#   python -m omnismola.main --coordinator_address=FIRST_NODE:PORT \
#       --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID ARGS...
#
# with all of the node's GPUs. It is a script rather than a plain
# `srun python ...` because SLURM_PROCID differs per process: it has to be
# read inside each task, after srun has started it.
#
#   srun --ntasks-per-node=1 launch/gpu_multinode.sh --config=configs/mix.py \
#       --workdir=/shared/run1 [--config.x.y=...]
#
# launch/gpu_slurm.sbatch wraps this for sbatch. Environment:
#   SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_PROCID   set by srun
#   JAX_COORDINATOR_ADDRESS     HOST:PORT of process 0; default: the first
#                               host of SLURM_JOB_NODELIST (scontrol show
#                               hostnames) and OMNISMOLA_COORDINATOR_PORT
#   OMNISMOLA_COORDINATOR_PORT  default 12345
#   OMNISMOLA_PYTHON            interpreter (default: python on PATH)
#   DRY_RUN=1 or --dry-run as the first argument: print the command, run nothing
set -euo pipefail

readonly PROG=${0##*/}
# die, quote_cmd, exec_cmd.
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DRY_RUN=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
(($#)) || die "no arguments for omnismola.main (at least --config=... --workdir=...)"

under_srun="run it with srun inside a SLURM allocation (see launch/gpu_slurm.sbatch)"
[[ -n ${SLURM_NTASKS:-} ]] || die "SLURM_NTASKS is not set: $under_srun"
[[ -n ${SLURM_PROCID:-} ]] || die "SLURM_PROCID is not set: $under_srun"
[[ $SLURM_NTASKS =~ ^[0-9]+$ && $SLURM_PROCID =~ ^[0-9]+$ ]] ||
  die "SLURM_NTASKS='$SLURM_NTASKS' and SLURM_PROCID='$SLURM_PROCID' must be numbers"
((SLURM_PROCID < SLURM_NTASKS)) ||
  die "SLURM_PROCID=$SLURM_PROCID is not below SLURM_NTASKS=$SLURM_NTASKS"
# Each process takes every GPU it sees: two on one node would fight over
# them. srun sets SLURM_STEP_NUM_NODES; a dry run may leave it out.
if [[ -n ${SLURM_STEP_NUM_NODES:-} ]] && ((SLURM_STEP_NUM_NODES != SLURM_NTASKS)); then
  die "$SLURM_NTASKS processes on $SLURM_STEP_NUM_NODES nodes:" \
    "start one per node (srun --ntasks-per-node=1)"
fi

coordinator=${JAX_COORDINATOR_ADDRESS:-}
if [[ -z $coordinator ]]; then
  [[ -n ${SLURM_JOB_NODELIST:-} ]] ||
    die "SLURM_JOB_NODELIST is not set (nor JAX_COORDINATOR_ADDRESS): $under_srun"
  # Process 0 runs on the first node of the allocation; every process
  # computes the same name from the same node list.
  first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
  [[ -n $first_host ]] ||
    die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
  coordinator=$first_host:${OMNISMOLA_COORDINATOR_PORT:-12345}
fi

exec_cmd "${OMNISMOLA_PYTHON:-python}" -m omnismola.main \
  --coordinator_address="$coordinator" --num_processes="$SLURM_NTASKS" \
  --process_id="$SLURM_PROCID" "$@"
