#!/usr/bin/env bash
# Continued pretraining of a pruned Sheared-LLaMA model (the output of scripts/pruning.sh).
#   scripts/continue_pretraining.sh [1.3b|2.7b] PRUNED_MODEL DATA_ROOT [dotted.key=value ...]
# PRUNED_MODEL: ckpt/<pruning run>/pruned-latest-rank0.pt; DATA_ROOT: `llmhift.datasets.prepare` output;
# TOKENIZER (environment): a folder holding the LLaMA-2 tokenizer, e.g. the source HF model.
# GPUs per node come from NPROC (default: every visible GPU); multi-node: set WORLD_SIZE, NODE_RANK,
# MASTER_ADDR, MASTER_PORT as Composer's launcher expects. The run autoresumes from its save_folder.
set -euo pipefail
SIZE=${1:?usage: scripts/continue_pretraining.sh [1.3b|2.7b] PRUNED_MODEL DATA_ROOT [key=value ...]}
PRUNED=${2:?pruned model missing}
DATA=${3:?data root missing}
shift 3
PYTHON=${PYTHON:-python}
COMPOSER=${COMPOSER:-composer}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}

TOKENIZER=${TOKENIZER:?set TOKENIZER to a folder holding the LLaMA-2 tokenizer (the source HF model)}

"$COMPOSER" -n "$NPROC" train.py "yamls/pretrain/llama2_${SIZE}.yaml" variables.pruned_model="$PRUNED" \
    variables.data_root="$DATA" variables.tokenizer="$TOKENIZER" "$@"
