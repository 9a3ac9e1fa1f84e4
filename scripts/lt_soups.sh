#!/usr/bin/env bash
# LT-Soups end to end: stage-1 ingredients, one independent job per (balance factor, branch);
# per factor the uniform soup of its branches; the progressive soup over factors (b = 1 first, the most imbalanced
# last, soup = (1-LAM)*soup + LAM*next); stage 2 re-trains the head on the full LT data from the soup.
#
#   bash scripts/lt_soups.sh                                  # everything, CIFAR-100-LT rho 100, factors 2^0..2^6 x 2
#   FACTORS="0 2 4 6" BRANCHES=1 OUT=runs/lts bash scripts/lt_soups.sh all -- --mixed_precision bf16
#   bash scripts/lt_soups.sh stage1 5                         # only job 5 (factor index 5 // BRANCHES, branch 5 % BRANCHES)
#   bash scripts/lt_soups.sh soup && bash scripts/lt_soups.sh stage2
#   LAUNCH=python DATASET=fashion_mnist_lt MODEL=path/to/clip bash scripts/lt_soups.sh   # CPU, no accelerate launcher
#   SOUP_ARGS="--merge_method ties --density 0.2" bash scripts/lt_soups.sh soup   # TIES-merge the progressive soup
#
# Steps: all (default) | stage1 [JOB_INDEX] | soup | stage2 | jobs (print the number of stage-1 jobs).
# Flags after `--` go to every train_lt.py call (e.g. --data_dir, --max_train_steps). Finished jobs (an export
# in their output dir) are skipped, so a re-run resumes the recipe. A Slurm array version: scripts/lt_soups_slurm.sh.
# SOUP_ARGS: extra soup.py flags for the progressive soup (e.g. a --merge_method and its flags); BRANCH_SOUP_ARGS: for
# the per-factor branch soups. Both are split on whitespace; default none (LT-Soups' plain averages).
set -euo pipefail

DATASET=${DATASET:-cifar100_lt}
IMB=${IMB:-100}
MODEL=${MODEL:-openai/clip-vit-base-patch16}
FACTORS=${FACTORS:-"0 1 2 3 4 5 6"}   # k: each ingredient trains on classes capped at n_min * 2^k
BRANCHES=${BRANCHES:-2}               # runs per factor, averaged uniformly (LT-Soups' meta_bsz)
LAM=${LAM:-0.7}
SEED=${SEED:-0}
OUT=${OUT:-outputs/lt_soups}
LAUNCH=${LAUNCH:-"accelerate launch"}
read -r -a soup_args <<< "${SOUP_ARGS:-}"
read -r -a branch_soup_args <<< "${BRANCH_SOUP_ARGS:-}"
# LT-Soups' own settings per dataset (its exact subsets, split, warm-up, EMA and 5 validations per run)
preset=ltsoups; [[ $DATASET == cifar10_lt ]] && preset=ltsoups_cifar10
STAGE1_CONFIG=${STAGE1_CONFIG:-configs/${preset}_stage1_full.yaml}
STAGE2_CONFIG=${STAGE2_CONFIG:-configs/${preset}_stage2_head.yaml}
PYTHON=${PYTHON:-python}

cd "$(dirname "$0")/.."
step=${1:-all}
[[ $# -gt 0 ]] && shift
job_index=""
if [[ $step == stage1 && $# -gt 0 && $1 != -- ]]; then job_index=$1; shift; fi
[[ ${1:-} == -- ]] && shift
extra=("$@")
read -r -a factors <<< "$FACTORS"
common=(--dataset "$DATASET" --imb "$IMB" --model_name_or_path "$MODEL")

run_dir() { echo "$OUT/stage1/k$1_branch$2"; }
export_of() { if [[ -d $1/best ]]; then echo "$1/best"; else echo "$1/final"; fi; }

stage1_job() {  # $1: job index in 0 .. len(factors) * BRANCHES - 1
    local position=$(($1 / BRANCHES)) branch=$(($1 % BRANCHES))
    local k=${factors[$position]}
    local dir; dir=$(run_dir "$k" "$branch")
    if [[ -d $dir/final ]]; then echo "skip $dir (done)"; return; fi
    local loss=la; [[ $k == 0 ]] && loss=ce  # b = 1 is balanced: no prior to adjust for
    local restart=(--overwrite_output_dir)  # an interrupted job resumes from its last step_* checkpoint
    compgen -G "$dir/step_*" > /dev/null && restart=(--resume_from_checkpoint latest)
    # the same subset for both branches, seeded by the factor's position in FACTORS (as LT-Soups); other data
    # order and augmentation (seed)
    $LAUNCH train_lt.py --config "$STAGE1_CONFIG" "${common[@]}" --balance_factor $((2 ** k)) --subset_seed "$position" \
        --loss "$loss" --seed $((SEED + 1000 * k + branch)) --output_dir "$dir" "${restart[@]}" "${extra[@]}"
}

stage1() {
    local n=$((${#factors[@]} * BRANCHES))
    if [[ -n $job_index ]]; then stage1_job "$job_index"; return; fi
    for ((i = 0; i < n; i++)); do stage1_job "$i"; done
}

soup() {
    local per_factor=()
    for k in "${factors[@]}"; do
        local branches=()
        for ((b = 0; b < BRANCHES; b++)); do branches+=("$(export_of "$(run_dir "$k" "$b")")"); done
        if ((BRANCHES == 1)); then per_factor+=("${branches[0]}"); continue; fi
        $PYTHON soup.py "${branches[@]}" --output_dir "$OUT/soups/k$k" --overwrite "${branch_soup_args[@]}"
        per_factor+=("$OUT/soups/k$k")
    done
    $PYTHON soup.py "${per_factor[@]}" --mode progressive --lam "$LAM" --output_dir "$OUT/soup" --overwrite "${soup_args[@]}"
}

stage2() {
    $LAUNCH train_lt.py --config "$STAGE2_CONFIG" "${common[@]}" --init_from "$OUT/soup" --seed "$SEED" \
        --output_dir "$OUT/stage2" --overwrite_output_dir "${extra[@]}"
}

case $step in
    all) stage1; soup; stage2 ;;
    stage1) stage1 ;;
    soup) soup ;;
    stage2) stage2 ;;
    jobs) echo $((${#factors[@]} * BRANCHES)) ;;
    *) echo "error: unknown step '$step'; use all, stage1 [JOB_INDEX], soup, stage2 or jobs" >&2; exit 2 ;;
esac
