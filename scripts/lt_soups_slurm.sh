#!/usr/bin/env bash
# LT-Soups on a Slurm cluster: the stage-1 ingredients as one array job (a task per (factor, branch), all in
# parallel), then one dependent job for the soups and stage 2. Every task runs scripts/lt_soups.sh, so the two
# stay in step; configure both with the same environment (DATASET, IMB, MODEL, FACTORS, BRANCHES, LAM, OUT, ...).
#
#   OUT=/scratch/$USER/lt_soups bash scripts/lt_soups_slurm.sh -- --mixed_precision bf16
#   PARTITION=gpu TIME=08:00:00 GPUS=1 bash scripts/lt_soups_slurm.sh
#
# Edit the #SBATCH-style settings below (or set them in the environment) for your cluster. Failed tasks can be
# re-submitted alone: sbatch --array=<ids> with the same script; finished tasks are skipped by lt_soups.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PARTITION=${PARTITION:-gpu}
GPUS=${GPUS:-1}
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

array_id=$(sbatch --parsable "${common[@]}" --job-name=ltsoups-stage1 --array="0-$((jobs - 1))" \
    --output="$LOGS/stage1_%a.out" \
    --wrap="bash scripts/lt_soups.sh stage1 \$SLURM_ARRAY_TASK_ID --$extra")
echo "stage 1: array job $array_id ($jobs tasks)"

final_id=$(sbatch --parsable "${common[@]}" --job-name=ltsoups-soup-stage2 --dependency="afterok:$array_id" \
    --output="$LOGS/soup_stage2.out" \
    --wrap="bash scripts/lt_soups.sh soup && bash scripts/lt_soups.sh stage2 --$extra")
echo "soup + stage 2: job $final_id (starts when every stage-1 task has succeeded)"
