#!/usr/bin/env bash
# Prune LLaMA-2-7B to a Sheared-LLaMA shape, then turn the masked checkpoint into the small dense model.
#   scripts/pruning.sh [1.3b|2.7b] SOURCE_MODEL DATA_ROOT [dotted.key=value ...]
# SOURCE_MODEL: an HF folder or a `save_hf_to_composer` .pt; DATA_ROOT: `llmhift.datasets.prepare` output.
# GPUs per node come from NPROC (default: every visible GPU); multi-node: set WORLD_SIZE, NODE_RANK,
# MASTER_ADDR, MASTER_PORT as Composer's launcher expects (any scheduler's wrapper can set them).
set -euo pipefail
SIZE=${1:?usage: scripts/pruning.sh [1.3b|2.7b] SOURCE_MODEL DATA_ROOT [key=value ...]}
SOURCE=${2:?source model missing}
DATA=${3:?data root missing}
shift 3
PYTHON=${PYTHON:-python}
COMPOSER=${COMPOSER:-composer}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
YAML=yamls/pruning/llama2_7b_to_${SIZE}.yaml
RUN_NAME=${RUN_NAME:-llama2-7b-to-${SIZE}-pruning}
SAVE=${SAVE_FOLDER:-ckpt/${RUN_NAME}}

"$COMPOSER" -n "$NPROC" train.py "$YAML" variables.source_model="$SOURCE" variables.data_root="$DATA" \
    variables.run_name="$RUN_NAME" save_folder="$SAVE" "$@"
if [ "${NODE_RANK:-0}" = 0 ]; then
    "$PYTHON" -m llmhift.convert.post_pruning prune_and_save_model "$SAVE/latest-rank0.pt"
fi
