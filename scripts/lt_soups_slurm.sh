#!/usr/bin/env bash
# LT-Soups on a Slurm cluster: the stage-1 ingredients as one array job (a task per (factor, branch), all in
# parallel), then one dependent job for the soups and stage 2. Every task runs scripts/lt_soups.sh, so the two
# stay in step; configure both with the same environment (DATASET, IMB, MODEL, FACTORS, BRANCHES, LAM, OUT, ...).
#
#   OUT=/scratch/$USER/lt_soups bash scripts/lt_soups_slurm.sh -- --mixed_precision bf16
#   PARTITION=gpu TIME=08:00:00 GPUS=1 bash scripts/lt_soups_slurm.sh
#   NODES=2 GPUS=8 bash scripts/lt_soups_slurm.sh       # each training task on 2 nodes x 8 GPUs
#
# NODES > 1: every training task runs on each of its nodes (srun) through accelerate_configs/multi_node.yaml, with
# the node's machine rank and the first node's address from Slurm (the `node` step below); the soups run once.
#
# Edit the #SBATCH-style settings below (or set them in the environment) for your cluster. Failed tasks can be
# re-submitted alone: sbatch --array=<ids> with the same script; finished tasks are skipped by lt_soups.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PARTITION=${PARTITION:-gpu}
GPUS=${GPUS:-1}
NODES=${NODES:-1}
if [[ ${1:-} == node ]]; then  # inside a multi-node task, on every node: `node STEP ARGS...` runs lt_soups.sh STEP
    shift
    main_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # reads every line: head would leave scontrol a broken pipe under pipefail
    export LAUNCH="accelerate launch --config_file accelerate_configs/multi_node.yaml --num_machines $SLURM_NNODES \
--num_processes $((SLURM_NNODES * GPUS)) --machine_rank $SLURM_NODEID --main_process_ip $main_ip \
--main_process_port ${PORT:-$((20000 + SLURM_JOB_ID % 20000))}"  # a port per job: array tasks may share nodes
    exec bash scripts/lt_soups.sh "$@"
fi
CPUS=${CPUS:-8}
MEM=${MEM:-64G}
TIME=${TIME:-12:00:00}
LOGS=${LOGS:-${OUT:-outputs/lt_soups}/slurm}
export LAUNCH=${LAUNCH:-"accelerate launch --num_processes $GPUS"}
[[ ${1:-} == -- ]] && shift
extra=""
(($#)) && extra=$(printf ' %q' "$@")  # train_lt.py flags, quoted for the --wrap shell

mkdir -p "$LOGS"
jobs=$(bash scripts/lt_soups.sh jobs)
common=(--partition="$PARTITION" --gres="gpu:$GPUS" --cpus-per-task="$CPUS" --mem="$MEM" --time="$TIME" --export=ALL)
train="bash scripts/lt_soups.sh"
if ((NODES > 1)); then
    common+=(--nodes="$NODES" --ntasks-per-node=1)
    train="srun bash scripts/lt_soups_slurm.sh node"
fi

array_id=$(sbatch --parsable "${common[@]}" --job-name=ltsoups-stage1 --array="0-$((jobs - 1))" \
    --output="$LOGS/stage1_%a.out" \
    --wrap="$train stage1 \$SLURM_ARRAY_TASK_ID --$extra")
echo "stage 1: array job $array_id ($jobs tasks)"

final_id=$(sbatch --parsable "${common[@]}" --job-name=ltsoups-soup-stage2 --dependency="afterok:$array_id" \
    --output="$LOGS/soup_stage2.out" \
    --wrap="bash scripts/lt_soups.sh soup && $train stage2 --$extra")
echo "soup + stage 2: job $final_id (starts when every stage-1 task has succeeded)"
