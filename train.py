"""Train with llmhift from a yaml: ``python train.py YAML [dotted.key=value ...] [--dry-run | --eval-only]``.

``--eval-only`` (or ``max_duration: 0ba``) loads the model (``model.pretrained``, ``load_path``, or with
``autoresume=true`` the save folder's newest good checkpoint), evaluates every evaluator, logs the
metrics to the yaml's loggers, and exits, writing no checkpoint and no config.yaml.

Multi-GPU / multi-node: ``composer -n 8 train.py YAML ...`` (Composer's launcher sets up the ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import torch
from composer.core import Time
from composer.utils import dist
from transformers import AutoConfig, AutoModelForCausalLM

from llmhift.build.config import ConfigError, TrainConfig, device_batch_sizes, load_config
from llmhift.build.memory import (
    GiB,
    ModelShape,
    count_params,
    default_world_size,
    estimate_run,
    max_positions,
    parse_memory,
    what_fits,
)
from llmhift.build.optimizers import check_installed
from llmhift.build.resolve import SHAPE_FIELDS, Resolution
from llmhift.build.throughput import PEAK_BF16_FLOPS, duration_tokens, plan_lines
from llmhift.build.trainer import (
    build_algorithms,
    build_callbacks,
    build_loggers,
    build_model,
    build_trainer,
    check_activation_checkpointing,
    check_data,
    check_optimization,
    check_peft,
    check_precision,
    check_tokenizer,
    resolve_model,
)
from llmhift.checkpoint.run_folder import LATEST_NAME, DiskFullError
from llmhift.errors import cli_errors


def _count(params) -> int:
    return sum(p.numel() for p in params)


def dry_run(config: TrainConfig, world_size: int = 1, gpu_memory: int | None = None, gpu: str | None = None) -> None:
    """Validates everything that does not need data or weights, prints the resolved architecture,
    the model's size and the per-GPU memory estimate for ``world_size`` ranks.

    Settings are errors; what depends on this machine (data folders, tokenizer, a GPU for amp_*, the
    pretrained model) is reported as a note, since a dry run usually happens away from the cluster.
    The architecture needs only ``model.pretrained``'s config (a folder holding its config.json will
    do), never its weights. ``gpu_memory`` (bytes): also print what fits in it, per the estimate.
    """
    check_optimization(config)
    check_peft(config)
    check_activation_checkpointing(config)
    build_callbacks(config)
    build_loggers(config)
    build_algorithms(config)
    device_batch_sizes(config, world_size=world_size, on_gpu=True)
    resolution = resolve_model(config, missing_ok=True)
    for line in resolution.warnings:
        print(f"warning: {line}")
    for check in (check_data, check_tokenizer, check_precision, lambda c: check_installed(c.optimizer)):
        try:
            check(config)
        except ConfigError as err:
            print(f"note: {err} (a real run stops here)")
    if not _print_architecture(resolution):
        return
    hf = config.model["name"] == "hf_causal_lm"
    model = _print_hf_size(config, resolution.overrides) if hf else _print_llama_size(config)
    try:
        shape = ModelShape.from_hf(model.config) if hf else ModelShape.from_llama(model.config)
        if config.model.get("peft"):
            print("note: no memory estimate: it counts a base model, not model.peft's adapters or 4-bit weights")
        else:
            print("\n".join(estimate_run(config, model, shape, world_size=world_size).lines()))
        if gpu_memory and not config.model.get("peft"):
            seq_len, batch, longest = what_fits(config, model, shape, world_size, gpu_memory)
            print(f"fits in {gpu_memory / GiB:.1f} GiB per GPU (estimate, without the 1-3 GiB of CUDA context): "
                  f"micro-batch {batch} at seq {seq_len}; seq {longest} at micro-batch 1 "
                  f"(at most the model's {max_positions(model)} positions)")
        seq_len = config.train_loader.dataset.max_seq_len or config.model.get("max_seq_len")
        if seq_len:
            print("\n".join(plan_lines(shape, seq_len, gpu, world_size, duration_tokens(config, seq_len))))
    except ValueError as err:  # a model family or setting the estimate has no formula for
        print(f"note: no memory estimate: {err}")


def _print_architecture(resolution: Resolution) -> bool:
    """Prints each field of the resolved architecture, and where it came from when not the checkpoint.
    False when model.pretrained is not on this machine and a size would rest on llmhift's defaults."""
    if resolution.note:
        defaults = [k for k in SHAPE_FIELDS if resolution.origin.get(k, "default") == "default"]
        if defaults or not resolution.fields:
            print(f"note: {resolution.note}, so the model's architecture and size are unknown; a folder holding "
                  "its config.json is enough for a dry run (a real run stops here)")
            return False
        print(f"note: {resolution.note}; the architecture below is the yaml's (a real run stops here)")
    print(f"architecture: {resolution.source or 'the yaml and llmhift defaults (no checkpoint config)'}")
    for key, value in resolution.fields.items():
        origin = resolution.origin.get(key)
        print(f"  {key}: {value!r}" + (f"  ({origin})" if origin else ""))
    return True


def _print_hf_size(config: TrainConfig, overrides: dict) -> torch.nn.Module:
    hf_config = AutoConfig.from_pretrained(config.model["pretrained"], local_files_only=True)
    hf_config.update(overrides)  # as from_pretrained(path, key=value) does
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    total = _count(model.parameters())
    print(f"model: hf_causal_lm {model.config.model_type}, {total:,} parameters ({total / 1e9:.3f}B)")
    return model


def _print_llama_size(config: TrainConfig) -> torch.nn.Module:
    without_weights = dataclasses.replace(config, model={k: v for k, v in config.model.items() if k != "pretrained"})
    with torch.device("meta"):
        model = build_model(without_weights)
    llama, inner = model.config, model.model
    total = _count(inner.parameters())
    embedding = inner.tok_embeddings.weight.numel() + (0 if inner.lm_head is None else inner.lm_head.weight.numel())
    print(f"model: llama, {total:,} parameters ({total / 1e9:.3f}B)")
    print(f"  non-embedding: {total - embedding:,}; embeddings and head: {embedding:,}")
    print(f"  shape: d_model {llama.d_model}, heads {llama.n_heads} (kv {llama.n_kv_heads}, head_dim "
          f"{llama.head_dim}), layers {llama.n_layers}, intermediate {llama.intermediate_size}, vocab {llama.vocab_size}")
    if model.mask_source is not None:
        target = model.mask_source.target
        source_count, target_count = count_params(llama), count_params(target)
        print(f"pruning: source {source_count:,} ({source_count / 1e9:.2f}B) -> target {target_count:,} "
              f"({target_count / 1e9:.2f}B): d_model {target.d_model}, heads {target.n_heads} "
              f"(kv {target.n_kv_heads}), layers {target.n_layers}, intermediate {target.intermediate_size}")
    return model


def _zero_duration(max_duration: str) -> bool:
    """``max_duration: 0ba`` (any unit) asks for no training, which Composer's fit refuses: evaluate."""
    try:
        return Time.from_timestring(str(max_duration)).value == 0
    except ValueError:  # not a time string: the Trainer names it
        return False


@cli_errors(DiskFullError)  # and every UserError: a bad yaml, a refused output, a full disk
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("yaml")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print parameter counts and a per-GPU memory estimate, and exit")
    parser.add_argument("--eval-only", action="store_true",
                        help="load the model, evaluate every evaluator, log the metrics, and exit (no training, "
                             "no checkpoint); max_duration: 0ba means the same")
    parser.add_argument("--world-size", type=int, default=default_world_size(), metavar="N",
                        help="ranks the dry run's memory estimate assumes (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="with --dry-run: the largest micro-batch and the longest sequence that fit in SIZE "
                             "(e.g. 24GiB) per GPU, per the estimate")
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16_FLOPS),
                        help="the dry run also prints expected tokens/s and wall time on this GPU")
    args = parser.parse_intermixed_args(argv)  # --dry-run may come anywhere among the overrides
    if args.world_size < 1:
        parser.error(f"--world-size: must be a positive number of ranks, got {args.world_size}")
    if args.gpu_memory is not None and not args.dry_run:
        raise ConfigError("--gpu-memory: only with --dry-run; add --dry-run")
    gpu_memory = None if args.gpu_memory is None else parse_memory(args.gpu_memory)
    config = load_config(args.yaml, args.overrides)
    if args.dry_run:
        dry_run(config, args.world_size, gpu_memory, args.gpu)
        return 0
    eval_only = args.eval_only or _zero_duration(config.max_duration)
    trainer = build_trainer(config, eval_only=eval_only)
    if eval_only:
        trainer.eval()
        if dist.get_global_rank() == 0:  # the loggers hold every metric; the console gets a summary
            values = sorted(trainer.state.eval_metric_values.items())
            shown = ", ".join(f"{name} {float(value):.4f}" for name, value in values)
            print(f"eval at batch {int(trainer.state.timestamp.batch)}: {shown}")
        trainer.close()
        return 0
    state = trainer.state
    done = state.timestamp.get(state.max_duration.unit)
    if state.max_duration <= done:
        # An unattended restart loop relaunches a run that already finished: nothing to train is success.
        print(f"run already finished: {done} of max_duration {state.max_duration}; nothing to train")
        trainer.close()
        return 0
    try:
        if config.eval_first and int(trainer.state.timestamp.batch) == 0:
            trainer.eval()
        trainer.fit()  # a full disk (a checkpoint, HiFT's parked optimizer state) ends in main's one error line
    finally:
        trainer.close()  # unlocks the save folder now, not at the process's exit (in-process callers, tests)
    if config.save_folder and "://" not in config.save_folder and dist.get_global_rank() == 0:
        folder = Path(config.save_folder.format(run_name=config.run_name))
        print(f"checkpoint: {folder / LATEST_NAME.format(rank=0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
