#!/usr/bin/env bash
# A sweep of model x method x sparsity x seed: one SLURM array task per row of a grid file.
#
#   mkdir -p logs && sbatch --array=1-$(bash slurm/array.sh --count slurm/grid.csv) slurm/array.sh slurm/grid.csv
#   SLURM_ARRAY_TASK_ID=3 bash slurm/array.sh slurm/grid.csv      # the same row, on this machine
#   bash slurm/array.sh --list slurm/grid.csv                        # the rows with their task ids
#   python slurm/collect.py results/sweep                            # merge finished rows into one table
#
# Grid: CSV `model,method,sparsity,seed` (a header line starting with `model` is skipped) or the same four
# fields separated by spaces; blank lines and lines starting with # are ignored. Task id N runs the N-th row
# (from 1). Each row writes to its own folder RESULTS/<model>__<method>__s<sparsity>__seed<seed>/ and gets a
# DONE marker only after its command succeeded, so a re-submitted array skips finished rows and re-runs the
# rest (add `--checkpoint-dir {out}/checkpoints --resume` to ROW_ARGS of a fine-tuning stage to resume it).
#
# Environment: RESULTS (results/sweep), STAGE (score), ROW_ARGS (the stage's arguments, with {model}
# {method} {sparsity} {seed} {out} filled in per row; default below), EXTRA_ARGS (appended, word-split),
# LAUNCHER (torchrun; `none` = one process) and the variables of launch/run.sh (SAFENEURONS_DRY_RUN=1 prints
# the row's command and runs nothing).
#SBATCH --job-name=safeneurons-sweep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

REPO="${SAFENEURONS_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
DEFAULT_ROW_ARGS="--model {model} --score-method {method} --sparsity-ratio {sparsity} --seed {seed} --out {out}"

grid_rows() {  # the grid's data rows as "model method sparsity seed", one a line
    sed -e 's/#.*//' -e 's/,/ /g' "$1" | awk 'NF && tolower($1) != "model" { print $1, $2, $3, $4 }'
}

usage() {
    echo "usage: [SLURM_ARRAY_TASK_ID=N] bash slurm/array.sh [--count|--list] GRID_FILE" >&2
    exit 2
}

mode=run
case "${1:-}" in
    --count|--list) mode="${1#--}"; shift ;;
esac
[[ $# -eq 1 ]] || usage
GRID="$1"
[[ -f "$GRID" ]] || { echo "slurm/array.sh: error: grid file $GRID does not exist" >&2; exit 2; }

if [[ "$mode" == count ]]; then grid_rows "$GRID" | wc -l; exit 0; fi
if [[ "$mode" == list ]]; then grid_rows "$GRID" | nl -w3 -s'  '; exit 0; fi

TASK="${SLURM_ARRAY_TASK_ID:?set SLURM_ARRAY_TASK_ID (sbatch --array=1-N does) to the grid row to run}"
ROW="$(grid_rows "$GRID" | sed -n "${TASK}p")"
if [[ ! "$TASK" =~ ^[0-9]+$ || -z "$ROW" ]]; then
    echo "slurm/array.sh: error: task id $TASK is not a row of $GRID (rows 1-$(grid_rows "$GRID" | wc -l))" >&2
    exit 2
fi
read -r model method sparsity seed <<<"$ROW"
if [[ -z "$seed" ]]; then
    echo "slurm/array.sh: error: row $TASK of $GRID is '$ROW'; expected model,method,sparsity,seed" >&2
    exit 2
fi

RESULTS="${RESULTS:-results/sweep}"
OUT="$RESULTS/${model//\//_}__${method}__s${sparsity}__seed${seed}"
if [[ -f "$OUT/DONE" ]]; then
    echo "slurm/array.sh: row $TASK ($model $method $sparsity $seed) is already done in $OUT; skipping" >&2
    exit 0
fi
args="${ROW_ARGS:-$DEFAULT_ROW_ARGS}"
args="${args//\{model\}/$model}"
args="${args//\{method\}/$method}"
args="${args//\{sparsity\}/$sparsity}"
args="${args//\{seed\}/$seed}"
args="${args//\{out\}/$OUT}"
# several tasks may share a node: give each its own rendezvous port
export MASTER_PORT="${MASTER_PORT:-$((20000 + (${SLURM_ARRAY_JOB_ID:-0} * 97 + TASK) % 20000))}"
export NNODES=1 NODE_RANK=0
# shellcheck disable=SC2086  # the arguments are meant to be split into words
"$REPO/launch/run.sh" "${LAUNCHER:-torchrun}" "${STAGE:-score}" $args ${EXTRA_ARGS:-}
[[ -z "${SAFENEURONS_DRY_RUN:-}" ]] || exit 0  # the command was only printed

mkdir -p "$OUT"
# row.json, then the marker, each renamed into place, so a folder with DONE always holds complete outputs
printf '{"task": %d, "model": "%s", "method": "%s", "sparsity": %s, "seed": %d, "stage": "%s", "finished": "%s"}\n' \
    "$TASK" "$model" "$method" "$sparsity" "$seed" "${STAGE:-score}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$OUT/.row.json.tmp"
mv "$OUT/.row.json.tmp" "$OUT/row.json"
echo done > "$OUT/.DONE.tmp"
mv "$OUT/.DONE.tmp" "$OUT/DONE"
echo "slurm/array.sh: row $TASK done in $OUT" >&2
