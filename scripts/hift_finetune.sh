#!/usr/bin/env bash
# HiFT full-parameter fine-tuning of a local Hugging Face model on instruction data.
#   scripts/hift_finetune.sh MODEL_DIR DATA_DIR [dotted.key=value ...]
# DATA_DIR holds train.jsonl and eval.jsonl. One GPU by default; NGPUS=2 runs DDP through Composer.
set -euo pipefail
if [ "$#" -lt 2 ]; then
  sed -n '2,4p' "$0" >&2
  exit 2
fi
MODEL_DIR=$1
DATA_DIR=$2
shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ "${NGPUS:-1}" -gt 1 ]; then
  exec "$(dirname "$PYTHON")/composer" -n "$NGPUS" train.py yamls/hift/llama2_7b.yaml \
    variables.model_dir="$MODEL_DIR" variables.data="$DATA_DIR" "$@"
fi
exec "$PYTHON" train.py yamls/hift/llama2_7b.yaml variables.model_dir="$MODEL_DIR" variables.data="$DATA_DIR" "$@"
