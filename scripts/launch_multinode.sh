#!/usr/bin/env bash
# Multi-node training from a Slurm job: run once per node (e.g. `srun --ntasks-per-node=1`), and this
# turns Slurm's environment into Composer's launcher arguments.
#   srun --ntasks-per-node=1 scripts/launch_multinode.sh YAML [dotted.key=value ...]
# From Slurm: SLURM_NNODES (nodes), SLURM_NODEID (this node's rank), SLURM_JOB_NODELIST (the first host,
# via `scontrol show hostnames`, is the rendezvous). GPUS_PER_NODE (default: every visible GPU) and
# MASTER_PORT (default 29500) may be set.
set -euo pipefail
if [ "$#" -lt 1 ]; then
  sed -n '2,7p' "$0" >&2
  exit 2
fi
YAML=$1
shift
for var in SLURM_NNODES SLURM_NODEID SLURM_JOB_NODELIST; do
  if [ -z "${!var:-}" ]; then
    echo "error: $var is not set ; run this inside a Slurm allocation (srun --ntasks-per-node=1 $0 ...)" >&2
    exit 2
  fi
done
PYTHON=${PYTHON:-python}
COMPOSER=${COMPOSER:-composer}
GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads every line: no SIGPIPE under pipefail
exec "$COMPOSER" -n "$GPUS_PER_NODE" --world_size $((SLURM_NNODES * GPUS_PER_NODE)) \
  --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  train.py "$YAML" "$@"
