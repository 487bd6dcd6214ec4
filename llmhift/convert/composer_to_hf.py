"""Convert LLaMA-family weights between Hugging Face folders and llmhift (Composer) checkpoints.

    python -m llmhift.convert.composer_to_hf save_hf_to_composer HF_DIR OUT.pt [overwrite=true]
    python -m llmhift.convert.composer_to_hf save_composer_to_hf CKPT OUT_DIR [key=value ...]

``save_composer_to_hf`` keys: ``dtype`` (fp32, bf16, fp16; default fp32), ``tokenizer`` (a folder to
copy into the output), ``overwrite`` (default false; replaces only this command's own previous
output), and any LlamaConfig field (``n_heads``, ``rope_theta``, ...) that neither the checkpoint nor
the weights' shapes tell. A ``model.peft`` run's checkpoint becomes an adapter folder for
``PeftModel.from_pretrained``, or with ``merge_peft=true`` (LoRA, AdaLoRA, IA3) an HF folder with the
adapters merged into the weights.
No Hub access: the HF config comes from the weights and the configs stored with them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from llmhift.atomic import atomic_directory, atomic_file, check_destination, check_inputs
from llmhift.checkpoint.io import (
    GENERATION_CONFIG_KEY,
    HF_CONFIG_KEY,
    L0_MODULE_KEY,
    LLMHIFT_KEY,
    MODEL_CONFIG_KEY,
    TOKENIZER_FILES_KEY,
    WRITTEN_BY,
    checked_metadata,
    load_checkpoint,
    model_state_dict,
    read_hf_weights,
    run_config_beside,
    source_metadata,
    stored_metadata,
    tokenizer_files,
    write_hf_weights,
)
from llmhift.convert.common import file_written_by, parse_overrides, save_torch_file
from llmhift.convert.peft_export import check_mergeable, rebuild_peft_model, write_peft_export
from llmhift.errors import cli_errors
from llmhift.models.hf_adapter import (
    ConversionError,
    check_state_dict_matches,
    hf_config_from_llama,
    hf_to_llmhift_state_dict,
    infer_llama_config,
    llama_config_from_hf,
    llmhift_to_hf_state_dict,
)
from llmhift.models.llama import MASK_SOURCE_PREFIX, LlamaConfig
from llmhift.models.peft import PEFT_CONFIG_KEY

__all__ = ["save_hf_to_composer", "save_composer_to_hf", "load_llama_checkpoint", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TO_COMPOSER, TO_HF = "save_hf_to_composer", "save_composer_to_hf"  # also the commands' output markers


def save_hf_to_composer(hf_dir: str | Path, out_path: str | Path, overwrite: bool = False) -> Path:
    """An HF LLaMA/Mistral folder -> a checkpoint whose ``state.model`` loads into ComposerLlama.

    The file also carries the model config, the source's config.json, generation_config.json and
    tokenizer files, so the way back to HF needs nothing else.
    """
    hf_dir = Path(hf_dir)
    check_inputs(out_path, [hf_dir])
    check_destination(out_path, overwrite, TO_COMPOSER, lambda path: file_written_by(path, TO_COMPOSER))
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face model folder")
    hf_config = json.loads(config_file.read_text())
    config = llama_config_from_hf(hf_config)
    weights = hf_to_llmhift_state_dict(read_hf_weights(hf_dir), config.tie_word_embeddings)
    check_state_dict_matches(weights, config)
    checkpoint = {
        "state": {"model": weights},
        LLMHIFT_KEY: {MODEL_CONFIG_KEY: config.to_dict(), **source_metadata(hf_dir), WRITTEN_BY: TO_COMPOSER},
    }
    needs = sum(t.numel() * t.element_size() for t in weights.values())
    with atomic_file(out_path, overwrite, command=TO_COMPOSER, inputs=[hf_dir], needs=needs,
                     own=lambda path: file_written_by(path, TO_COMPOSER)) as tmp:
        save_torch_file(checkpoint, tmp)
    return Path(out_path)


def load_llama_checkpoint(
    path: str | Path, overrides: Mapping[str, Any] | None = None
) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, ComposerLlama weights, llmhift metadata) of a checkpoint.

    The config comes from, in order of precedence: ``overrides``; the model config stored in the
    checkpoint (by train.py or a converter; a ``config.yaml`` beside that contradicts it is refused) or,
    for checkpoints older than that, the ``config.yaml`` train.py saved beside it; the weights' shapes.
    All of them are cross-checked against the shapes.
    """
    meta = checked_metadata(path)
    meta.pop(L0_MODULE_KEY, None)
    checkpoint = load_checkpoint(path, memory_map=True, model_only=True)
    tokenizer_dir = Path((run_config_beside(path).get("tokenizer") or {}).get("name") or "")
    if TOKENIZER_FILES_KEY not in meta and tokenizer_dir.name and tokenizer_dir.is_dir():
        meta[TOKENIZER_FILES_KEY] = tokenizer_files(tokenizer_dir)
    weights = model_state_dict(checkpoint)
    if any(k.startswith(MASK_SOURCE_PREFIX) for k in weights):
        raise ConversionError(
            f"{path} is a pruning checkpoint that still holds its L0 masks; make the small dense model first: "
            f"python -m llmhift.convert.post_pruning prune_and_save_model {path}"
        )
    known = {**meta.get(MODEL_CONFIG_KEY, {}), **(overrides or {})}
    return infer_llama_config(weights, known), weights, meta


def save_composer_to_hf(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    merge_peft: bool = False,
    **config_overrides: Any,
) -> Path:
    """A Composer checkpoint or state dict -> an HF LlamaForCausalLM folder (safetensors), atomically.

    With a source model known to the checkpoint (trained from an HF folder, or converted from one), the
    folder keeps what the source had: its config.json except the fields the weights changed (a pruned
    shape) and the dtype, its generation_config.json and its tokenizer files.

    A ``model.peft`` run's checkpoint (its metadata holds the adapters' config) becomes the adapter
    folder, or with ``merge_peft`` the source model with the adapters merged into its weights."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ConversionError(f"tokenizer={tokenizer} is not a folder")
    # A sharded checkpoint is a folder, `latest-rank0.pt` a symlink to it: both are inputs (resolved).
    # An output beside the checkpoint (ck/hf) is fine; ck itself contains the input and is refused.
    inputs = [Path(checkpoint_path), *([tokenizer] if tokenizer else [])]
    check_inputs(out_dir, inputs)
    check_destination(out_dir, overwrite, TO_HF)
    stored = stored_metadata(checkpoint_path)
    if PEFT_CONFIG_KEY in stored:
        if config_overrides:
            raise ConversionError(f"{sorted(config_overrides)}: LlamaConfig fields apply to llama checkpoints; a peft "
                                  "checkpoint's architecture is its source's config.json, drop them")
        return _save_peft(checkpoint_path, out_dir, stored, merge_peft, dtype, tokenizer, overwrite, inputs)
    if merge_peft:
        raise ConversionError(f"merge_peft=true: {checkpoint_path} holds no peft adapters (its run had no "
                              "model.peft); drop merge_peft")
    config, weights, meta = load_llama_checkpoint(checkpoint_path, config_overrides)
    hf_weights = {k: v.to(DTYPES[dtype]) for k, v in llmhift_to_hf_state_dict(weights).items()}
    hf_config = hf_config_from_llama(config, meta.get(HF_CONFIG_KEY))
    # transformers >= 4.56 writes and reads `dtype`, older versions `torch_dtype`: keep the source's key.
    dtype_key = "dtype" if "dtype" in hf_config else "torch_dtype"
    hf_config[dtype_key] = str(DTYPES[dtype]).removeprefix("torch.")
    tokenizer_content = tokenizer_files(tokenizer) if tokenizer else meta.get(TOKENIZER_FILES_KEY, {})
    needs = sum(t.numel() * t.element_size() for t in hf_weights.values())
    with atomic_directory(out_dir, overwrite, command=TO_HF, inputs=inputs, needs=needs) as tmp:
        write_hf_weights(hf_weights, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if GENERATION_CONFIG_KEY in meta:
            (tmp / "generation_config.json").write_text(json.dumps(meta[GENERATION_CONFIG_KEY], indent=2) + "\n")
        for name, content in tokenizer_content.items():
            (tmp / name).write_bytes(content)
    return Path(out_dir)


def _save_peft(checkpoint_path: str | Path, out_dir: str | Path, meta: dict[str, Any], merge: bool, dtype: str,
               tokenizer: str | Path | None, overwrite: bool, inputs: list[Any]) -> Path:
    """A peft checkpoint -> the merged HF folder or the adapter folder, with the source's generation
    config and tokenizer files beside, atomically."""
    if merge:
        check_mergeable(meta[PEFT_CONFIG_KEY])
    model = rebuild_peft_model(checkpoint_path, meta)
    tokenizer_content = tokenizer_files(tokenizer) if tokenizer else meta.get(TOKENIZER_FILES_KEY, {})
    needs = sum(p.numel() * DTYPES[dtype].itemsize for p in model.parameters())
    with atomic_directory(out_dir, overwrite, command=TO_HF, inputs=inputs, needs=needs) as tmp:
        write_peft_export(model, tmp, merge, DTYPES[dtype])
        if merge and GENERATION_CONFIG_KEY in meta:
            (tmp / "generation_config.json").write_text(json.dumps(meta[GENERATION_CONFIG_KEY], indent=2) + "\n")
        for name, content in tokenizer_content.items():
            (tmp / name).write_bytes(content)
    return Path(out_dir)


@cli_errors(OSError, TypeError)  # TypeError: an override that is no parameter of the command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmhift.convert.composer_to_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_composer = commands.add_parser("save_hf_to_composer", help="HF folder -> Composer checkpoint")
    to_composer.add_argument("hf_dir")
    to_composer.add_argument("out_path")
    to_composer.add_argument("overrides", nargs="*", metavar="overwrite=true")
    to_hf = commands.add_parser("save_composer_to_hf", help="Composer checkpoint -> HF folder")
    to_hf.add_argument("checkpoint")
    to_hf.add_argument("out_dir")
    to_hf.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.command == "save_hf_to_composer":
        unknown = set(overrides) - {"overwrite"}
        if unknown:
            raise ConversionError(f"save_hf_to_composer takes only overwrite=..., not {sorted(unknown)}")
        out = save_hf_to_composer(args.hf_dir, args.out_path, **overrides)
    else:
        out = save_composer_to_hf(args.checkpoint, args.out_dir, **overrides)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
