"""Downstream accuracy of any model the pipeline makes: ``python -m llmhift.evaluate MODEL --tasks ... --out DIR``.

MODEL is an HF folder, a Composer checkpoint (``latest-rank0.pt``, ``ep0-ba8-rank0.pt``, a sharded
folder) or a ``pruned-*.pt``; a checkpoint is exported to a temporary HF folder outside it (the same
conversion as ``llmhift.convert.composer_to_hf``), so the input is only read. Every argument is checked
before anything is loaded or written; the harness run itself is :func:`llmhift.downstream.evaluate_model`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from llmhift.atomic import check_inputs
from llmhift.checkpoint.io import training_progress
from llmhift.convert.composer_to_hf import save_composer_to_hf
from llmhift.downstream import (
    STAGES,
    SUITES,
    check_limit,
    check_out,
    evaluate_model,
    expand_tasks,
    harness_version,
    write_results,
)
from llmhift.errors import ConfigError, UserError, cli_errors

__all__ = ["infer_stage", "main"]


def infer_stage(model: Path) -> str:
    """``source`` for an HF folder, ``pruned`` for post_pruning's ``pruned-*`` file, else ``checkpoint``."""
    if (model / "config.json").is_file():
        return "source"
    return "pruned" if model.name.startswith("pruned-") else "checkpoint"


def _load_hf(folder: Path, tokenizer: Path | None) -> tuple[Any, Any]:
    import transformers

    tokenizer = tokenizer or folder
    if not (tokenizer / "tokenizer_config.json").is_file() and not (tokenizer / "tokenizer.json").is_file():
        raise UserError(f"{tokenizer} holds no tokenizer; pass --tokenizer DIR (the tokenizer the model was trained with)")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    return model, transformers.AutoTokenizer.from_pretrained(tokenizer)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llmhift.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="HF folder, Composer checkpoint, sharded folder or pruned-*.pt")
    p.add_argument("--tasks", required=True, help=f"comma-separated harness tasks or suites ({', '.join(SUITES)})")
    p.add_argument("--num-fewshot", type=int, help="in-context examples for every task (default: the suite's)")
    p.add_argument("--limit", type=int, help="at most this many documents per task (a quick look)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--include-path", help="folder of extra task yamls (local datasets, air-gapped clusters)")
    p.add_argument("--stage", choices=STAGES, help="what the model is (default: inferred from MODEL)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder when MODEL carries none")
    p.add_argument("--out", type=Path, required=True, help="folder for downstream.json and downstream.md")
    return p


@cli_errors(OSError)
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    model_path = args.model.absolute()
    if not model_path.exists():
        raise UserError(f"{args.model} does not exist; give an HF folder, a Composer checkpoint or a pruned-*.pt")
    check_limit(args.limit)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu or run on a GPU node")
    if args.tokenizer is not None and not args.tokenizer.is_dir():
        raise UserError(f"--tokenizer {args.tokenizer} is not a folder; give the tokenizer folder the model was "
                        "trained with")
    tokenizer_inputs = [args.tokenizer.absolute()] if args.tokenizer is not None else []
    # The input's folder too: results beside a checkpoint would land in the run folder it belongs to.
    check_inputs(args.out, [model_path, model_path if model_path.is_dir() else model_path.parent, *tokenizer_inputs])
    check_out(args.out)
    harness_version()
    specs = expand_tasks([t for t in args.tasks.split(",") if t], args.num_fewshot, include_path=args.include_path)
    stage = args.stage or infer_stage(model_path)
    tokens = batch = None
    with tempfile.TemporaryDirectory(prefix="llmhift-evaluate-") as tmp:
        if (model_path / "config.json").is_file():
            folder = model_path
        else:
            tokens, batch = training_progress(model_path)
            folder = save_composer_to_hf(model_path, Path(tmp) / "hf", tokenizer=args.tokenizer)
        model, tokenizer = _load_hf(folder, args.tokenizer)
    tasks = evaluate_model(model, tokenizer, specs, limit=args.limit, batch_size=args.batch_size,
                           device=args.device, include_path=args.include_path)
    record = {"model": str(model_path), "stage": stage, "tokens": tokens, "batch": batch,
              "harness": harness_version(), "tasks": tasks}
    print(write_results(args.out, record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
