#!/usr/bin/env bash
# Train (or evaluate) on a SLURM cluster: one task per GPU, started by srun, no torchrun.
#
#   tools/slurm_train.sh NODES GPUS_PER_NODE [SBATCH_OPTIONS...] SCRIPT [OPTIONS...]
#       submits itself with sbatch; SBATCH_OPTIONS in the --name=value form, e.g. --time=24:00:00
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 tools/slurm_train.sh SCRIPT [OPTIONS...]
#
# SCRIPT is a training script (bisenetv2/train.py, ...) or evaluate.py. With `--device cpu` among
# the options no GPU is requested and GPUS_PER_NODE is the number of processes per node. sbatch's
# own variables (SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_ACCOUNT, ...) apply as usual.
# A training run's folder is fixed by the job id, ${RUNS_DIR:-res/<model>}/slurm-<job id>, and it
# is started with `--resume auto`, so that a requeued job continues the same run.
#
# Stopping and requeueing (the trainer turns SIGTERM into a checkpoint at a whole iteration and
# exits 130):
# - time limit: SLURM sends USR1 to this shell 120 s before it (--signal=B:USR1@120); the shell
#   sends SIGTERM to the tasks, waits for their checkpoint, and requeues the job;
# - `scancel --signal=TERM JOBID`: the tasks checkpoint, and the job requeues itself. Not with
#   --full (srun gets the signal too, and kills its tasks at once on SIGTERM) nor --batch (this
#   shell ends, so nothing requeues the job);
# - `scancel JOBID` cancels the job for good;
# - pre-emption with PreemptMode=REQUEUE signals srun too: SLURM requeues the job (--requeue) and it
#   continues from the newest periodic checkpoint (--checkpoint-every).
#
#SBATCH --job-name=bisenet
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -uo pipefail

if [[ ${1:-} =~ ^[0-9]+$ ]]; then  # submission: NODES GPUS_PER_NODE [SBATCH_OPTIONS] SCRIPT ...
    if (($# < 3)) || ! [[ $2 =~ ^[0-9]+$ ]]; then
        echo "usage: $0 NODES GPUS_PER_NODE [SBATCH_OPTIONS...] SCRIPT [OPTIONS...]" >&2
        exit 2
    fi
    nodes=$1 per_node=$2
    shift 2
    sbatch_options=()
    while (($#)) && [[ $1 == -* ]]; do
        sbatch_options+=("$1")
        shift
    done
    repo=$(cd "$(dirname "$0")/.." && pwd)
    if ! (($#)) || ! (cd "$repo" && [[ -f $1 ]]); then  # the job runs in the repository
        echo "${1:-(none)}: no such script in $repo (SBATCH_OPTIONS take the --name=value form)" >&2
        exit 2
    fi
    gpus=(--gpus-per-node="$per_node")
    previous=""
    for arg in "$@"; do
        if [[ $arg == --device=cpu || ($previous == --device && $arg == cpu) ]]; then
            gpus=()
        fi
        previous=$arg
    done
    exec sbatch --nodes="$nodes" --ntasks-per-node="$per_node" "${gpus[@]}" --chdir="$repo" \
        "${sbatch_options[@]}" "$repo/tools/slurm_train.sh" "$@"
fi

if [[ -z ${SLURM_JOB_ID:-} || $# -lt 1 ]]; then
    echo "usage: $0 NODES GPUS_PER_NODE [SBATCH_OPTIONS...] SCRIPT [OPTIONS...]" >&2
    echo "   or: sbatch [SBATCH_OPTIONS...] $0 SCRIPT [OPTIONS...]" >&2
    exit 2
fi
script=$1
shift
if [[ ! -f $script ]]; then
    echo "$script: no such script under $(pwd) (submit from the repository, or with --chdir)" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
# USR1 (time limit near): SIGTERM to the tasks only, through the controller, not to srun. Set
# first: USR1's default action would end this shell.
trap 'echo "USR1: stopping the tasks at a checkpoint"; scancel --signal=TERM "$SLURM_JOB_ID"' USR1
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $script $*"

if [[ $(basename "$script") == evaluate.py ]]; then
    exec srun python "$script" "$@"
fi

model=$(basename "$(dirname "$(realpath "$script")")")
run_dir=${RUNS_DIR:-res/$model}/slurm-$SLURM_JOB_ID
# the options given after these override them (argparse keeps the last)
srun python "$script" --output-dir "$run_dir" --resume auto "$@" &
step=$!
while true; do
    wait "$step"
    code=$?
    kill -0 "$step" 2>/dev/null || break  # a trapped signal interrupted wait: keep waiting
done

state=$(squeue --noheader --jobs "$SLURM_JOB_ID" --format %T 2>/dev/null)
if ((code == 130)) && [[ $state == RUNNING ]]; then
    echo "stopped at a checkpoint in $run_dir: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"
