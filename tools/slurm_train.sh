#!/bin/bash
# Train on several nodes under SLURM: one torchrun per node (srun, one task per node), one process
# per GPU, the first node of the allocation as the rendezvous point.
#
#   sbatch --nodes 2 --gpus-per-node 4 tools/slurm_train.sh tools/cls_train.py \
#       --cfg experiments/imagenet/cls_mdeq_SMALL.yaml
#   sbatch --nodes 4 --gpus-per-node 4 tools/slurm_train.sh tools/seg_train.py \
#       --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml MODEL.PRETRAINED pretrained_models/cls_mdeq_SMALL.pkl
#
# Everything after the tool goes to it unchanged (--cfg, --modelDir, KEY VALUE overrides).
# TRAIN.RESUME True is added: the same command, submitted again after a time-out or a preemption,
# continues from checkpoint.pth.tar (a first run starts from scratch, with a warning).
# TRAIN.BATCH_SIZE_PER_GPU is per process: the global batch is nodes x GPUs per node x that.
#
# Environment: MASTER_PORT (default 20000 + job id mod 20000, so that jobs sharing a node do not
# collide), GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists).
#
#SBATCH --job-name=mdeq
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
# SIGTERM 5 minutes before the time limit: every rank finishes its step, rank 0 saves a checkpoint
# at that step, and the run exits with status 143 (see docs/reliability.md, "Stopping and resuming").
#SBATCH --signal=TERM@300

set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch [--nodes N --gpus-per-node G] $0 tools/cls_train.py|tools/seg_train.py --cfg FILE [KEY VALUE ...]" >&2
    exit 2
fi
: "${SLURM_JOB_NODELIST:?run this script with sbatch (or inside an salloc allocation)}"

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
fi
if [ "${GPUS_PER_NODE:-0}" -lt 1 ]; then
    echo "no GPUs found on the node: set GPUS_PER_NODE (or ask for --gpus-per-node)" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-$GPUS_PER_NODE} / GPUS_PER_NODE ))}
[ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1

echo "$(date): $NNODES nodes x $GPUS_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT: $*"

# SLURM_NODEID is evaluated by each node's task (single quotes), not here on the first node;
# exec hands SLURM's signals straight to torchrun, which passes them on to its processes.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec torchrun --nnodes "$0" --nproc_per_node "$1" --node_rank "$SLURM_NODEID" \
        --rdzv-endpoint "$2" "${@:3}" TRAIN.RESUME True
' "$NNODES" "$GPUS_PER_NODE" "$MASTER_ADDR:$MASTER_PORT" "$@"
