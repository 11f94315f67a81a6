#!/bin/bash
# Submit stage one to Slurm: an array of NUM_SHARDS precompute tasks, then one finalize job that
# starts only after every array task succeeded (afterok).
#
#   STUDENT=runs/sft TEACHER=runs/teacher PROMPTS=prompts/opd.jsonl OUT=runs/store \
#     bash examples/slurm/submit.sh NUM_SHARDS [lopd precompute flags...]
#
# Add --partition/--account etc. through SBATCH_PARTITION, SBATCH_ACCOUNT (sbatch reads them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
num_shards=${1:?usage: submit.sh NUM_SHARDS [lopd precompute flags...]}
shift
: "${OUT:?set OUT (and STUDENT, TEACHER, PROMPTS) before submitting}"

# --parsable prints "jobid[;cluster]"; --export=ALL hands STUDENT/TEACHER/PROMPTS/OUT/LOPD to the jobs.
array_job=$(sbatch --parsable --export=ALL --array="0-$((num_shards - 1))" "$here/precompute.sbatch" "$@")
array_job=${array_job%%;*}
finalize_job=$(sbatch --parsable --export="ALL,NUM_SHARDS=$num_shards" \
    --dependency="afterok:$array_job" --kill-on-invalid-dep=yes "$here/finalize.sbatch")
echo "submitted precompute array $array_job ($num_shards tasks) and finalize job ${finalize_job%%;*}"
