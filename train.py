"""Train with llmhift from a yaml: ``python train.py YAML [dotted.key=value ...] [--dry-run]``.

Multi-GPU / multi-node: ``composer -n 8 train.py YAML ...`` (Composer's launcher sets up the ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import torch
from composer.utils import dist

from llmhift.builders import (
    build_callbacks,
    build_llama_config,
    build_model,
    build_trainer,
    check_data,
    check_optimization,
    check_tokenizer,
)
from llmhift.config import ConfigError, TrainConfig, load_config


def _count(params) -> int:
    return sum(p.numel() for p in params)


def dry_run(config: TrainConfig) -> None:
    """Validates everything that does not need data or weights and prints the model's size."""
    check_optimization(config)
    build_callbacks(config)
    for check in (check_data, check_tokenizer):
        try:
            check(config)
        except ConfigError as err:
            print(f"note: {err} (a real run stops here)")
    without_weights = dataclasses.replace(config, model={k: v for k, v in config.model.items() if k != "pretrained"})
    with torch.device("meta"):
        model = build_model(without_weights)
    total = _count(model.parameters())
    print(f"model: {config.model['name']}, {total:,} parameters ({total / 1e9:.3f}B)")
    if config.model["name"] == "llama":
        llama = build_llama_config(config.model)
        inner = model.model
        embedding = inner.tok_embeddings.weight.numel() + (0 if inner.lm_head is None else inner.lm_head.weight.numel())
        print(f"  non-embedding: {total - embedding:,}; embeddings and head: {embedding:,}")
        print(f"  shape: d_model {llama.d_model}, heads {llama.n_heads} (kv {llama.n_kv_heads}, head_dim "
              f"{llama.head_dim}), layers {llama.n_layers}, intermediate {llama.intermediate_size}, vocab {llama.vocab_size}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("yaml")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    parser.add_argument("--dry-run", action="store_true", help="validate, print parameter counts, and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.yaml, args.overrides)
        if args.dry_run:
            dry_run(config)
            return 0
        trainer = build_trainer(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.eval_first and int(trainer.state.timestamp.batch) == 0:
        trainer.eval()
    trainer.fit()
    if config.save_folder and dist.get_global_rank() == 0:
        print(f"checkpoint: {Path(config.save_folder) / 'latest-rank0.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
