#!/usr/bin/env bash
# Run any safeneurons subcommand under a launcher, with the same arguments whatever the launcher.
#
#   launch/run.sh [torchrun|deepspeed|accelerate|mpirun|none] SUBCOMMAND [ARGS...]
#
# One call starts the processes of ONE node (torchrun, deepspeed, accelerate) or of the whole job (mpirun,
# started once). The job's shape comes from the environment, which slurm/multinode.sbatch sets per node:
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (GPUs here, else 1)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   PYTHON (python3)  HOSTFILE (deepspeed/mpirun, several nodes)  ACCELERATE_CONFIG (launch/accelerate/*.yaml)
#   SAFENEURONS_DRY_RUN=1 prints the command instead of running it.
# Examples:
#   launch/run.sh torchrun score --model llama2-7b-chat-hf --score-method wandg --data align --sparsity-ratio 0.01 --out r
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node01 launch/run.sh torchrun finetune --deepspeed ds_configs/zero3.json ...
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAUNCHERS="torchrun deepspeed accelerate mpirun none"
LAUNCHER=torchrun
if [[ $# -gt 0 && " $LAUNCHERS " == *" $1 "* ]]; then
    LAUNCHER="$1"
    shift
fi
if [[ $# -eq 0 ]]; then
    echo "usage: launch/run.sh [${LAUNCHERS// /|}] SUBCOMMAND [ARGS...]" >&2
    exit 2
fi

gpus_here() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | wc -l
    else
        echo 1
    fi
}

USER_MASTER_ADDR="${MASTER_ADDR:-}"
PYTHON="${PYTHON:-python3}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(gpus_here)}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
WORLD=$((NNODES * NPROC_PER_NODE))
export MASTER_ADDR MASTER_PORT

case "$LAUNCHER" in
    torchrun)
        command=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK"
                 --nproc-per-node "$NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
                 -m safeneurons.cli "$@")
        ;;
    deepspeed)
        command=("$PYTHON" -m deepspeed.launcher.runner --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
        if [[ "$NNODES" -gt 1 ]]; then
            # every node starts its own launcher (no ssh/pdsh); the hostfile names the nodes and their slots
            command+=(--hostfile "${HOSTFILE:?HOSTFILE is needed by deepspeed on several nodes}" --no_ssh
                      --node_rank "$NODE_RANK" --num_nodes "$NNODES" --num_gpus "$NPROC_PER_NODE")
        else
            command+=(--num_nodes 1 --num_gpus "$NPROC_PER_NODE")
        fi
        command+=(--module safeneurons.cli "$@")
        ;;
    accelerate)
        if [[ "$NNODES" -gt 1 ]]; then default_config="$HERE/accelerate/multi_node.yaml"
        else default_config="$HERE/accelerate/single_node.yaml"; fi
        command=("$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$default_config}"
                 --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes "$WORLD"
                 --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" -m safeneurons.cli "$@")
        ;;
    mpirun)
        # started once for the whole job; rank 0 tells the others MASTER_ADDR over MPI unless it is exported
        command=(mpirun -np "$WORLD" -x MASTER_PORT -x PATH)
        if [[ -n "$USER_MASTER_ADDR" ]]; then command+=(-x MASTER_ADDR); else unset MASTER_ADDR; fi
        if [[ "$NNODES" -gt 1 ]]; then command+=(--map-by "ppr:${NPROC_PER_NODE}:node"); fi
        if [[ -n "${HOSTFILE:-}" ]]; then command+=(--hostfile "$HOSTFILE"); fi
        if [[ "$(id -u)" == 0 ]]; then command+=(--allow-run-as-root); fi
        command+=("$PYTHON" -m safeneurons.cli "$@")
        ;;
    none)
        command=("$PYTHON" -m safeneurons.cli "$@")
        ;;
esac

if [[ -n "${SAFENEURONS_DRY_RUN:-}" ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
echo "[launch/run.sh node $NODE_RANK/$NNODES] ${command[*]}" >&2
exec "${command[@]}"
