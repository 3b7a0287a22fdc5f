#!/bin/bash
# Submit general distillation, then the GLUE sweep, which starts only once pretraining has
# completed successfully (--dependency=afterok), then the collection of the sweep into the GLUE
# table (slurm/glue_collect.sbatch, afterany of the sweep: a failed element leaves a hole, not
# an empty table). Run from anywhere: jobs start in the repository
# root, and relative paths in the variables below are taken from there.
#
#   OUTPUT_DIR=runs/general CORPUS=corpus/wiki128 TEACHER=/models/bert-base-uncased \
#   GLUE_DIR=data/glue TEACHER_ROOT=runs/teachers TASKS="sst2 mrpc" \
#   PRETRAIN_SBATCH="--nodes 4 --ntasks-per-node 8 --gpus-per-node 8" \
#     slurm/submit_pipeline.sh [PRETRAIN FLAGS ...] [-- GLUE FLAGS ...]
#
# The environment goes to both jobs (sbatch --export=ALL): see slurm/pretrain.sbatch and
# slurm/glue_sweep.sbatch for what each reads (SEEDS adds seeds to the grid; LEADERBOARD_ZIP
# asks the collect job for the leaderboard archive). PRETRAIN_SBATCH / SWEEP_SBATCH /
# COLLECT_SBATCH hold extra sbatch options (split on spaces). Prints the three job ids.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT_DIR:?set OUTPUT_DIR}" "${GLUE_DIR:?set GLUE_DIR}" "${TEACHER_ROOT:?set TEACHER_ROOT}"

pretrain_flags=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do pretrain_flags+=("$1"); shift; done
if [ $# -gt 0 ]; then shift; fi  # the "--"; what is left are the GLUE flags
export TASKS=${TASKS:-sst2} LRS=${LRS:-5e-5 1e-4 3e-4} SEEDS=${SEEDS:-42} PRETRAIN_OUT=$OUTPUT_DIR
read -ra tasks <<< "$TASKS"
read -ra rates <<< "$LRS"
read -ra seeds <<< "$SEEDS"
read -ra pretrain_opts <<< "${PRETRAIN_SBATCH:-}"
read -ra sweep_opts <<< "${SWEEP_SBATCH:-}"
read -ra collect_opts <<< "${COLLECT_SBATCH:-}"

pretrain_id=$(sbatch --parsable "${pretrain_opts[@]}" slurm/pretrain.sbatch "${pretrain_flags[@]}")
pretrain_id=${pretrain_id%%;*}  # "id;cluster" on multi-cluster setups
sweep_id=$(sbatch --parsable --dependency="afterok:$pretrain_id" \
    --array="0-$(( ${#tasks[@]} * ${#rates[@]} * ${#seeds[@]} - 1 ))" "${sweep_opts[@]}" slurm/glue_sweep.sbatch "$@")
sweep_id=${sweep_id%%;*}
collect_id=$(sbatch --parsable --dependency="afterany:$sweep_id" "${collect_opts[@]}" slurm/glue_collect.sbatch)
collect_id=${collect_id%%;*}
echo "pretrain job $pretrain_id; GLUE sweep job $sweep_id (${#tasks[@]} tasks x ${#rates[@]} rates x ${#seeds[@]}" \
     "seeds, afterok:$pretrain_id); collect job $collect_id (afterany:$sweep_id)"
