"""Check that an HF folder and a llmhift checkpoint compute the same logits on one random batch.

    python -m llmhift.convert.compare_logits HF_DIR COMPOSER_PT [--tol 1e-4] [--seq-len 64] [key=value ...]

Prints the max absolute difference of the full logits (not their mean, which hides local errors)
and exits 1 above the tolerance. fp32, eager attention on both sides; the GPU when there is one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import AutoModelForCausalLM

from llmhift.convert.common import parse_overrides
from llmhift.convert.composer_to_hf import load_llama_checkpoint
from llmhift.errors import cli_errors
from llmhift.models.hf_adapter import ConversionError
from llmhift.models.llama import ComposerLlama

__all__ = ["max_logit_difference", "main"]


def max_logit_difference(
    hf_dir: str,
    checkpoint: str,
    seq_len: int = 64,
    batch_size: int = 2,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> float:
    """Max |HF logits - ComposerLlama logits| on one seeded random batch; ``overrides`` complete the
    checkpoint's config as in ``save_composer_to_hf``."""
    if not (Path(hf_dir) / "config.json").is_file():  # else transformers reads the path as a Hub repo id
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face model folder")
    config, weights, _ = load_llama_checkpoint(checkpoint, overrides)  # memory-mapped: checked before HF loads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf = AutoModelForCausalLM.from_pretrained(
        hf_dir, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    )
    config.attn_impl = "eager"
    ours = ComposerLlama(config)
    ours.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    if hf.config.vocab_size != config.vocab_size:
        raise ConversionError(f"vocab sizes differ: HF {hf.config.vocab_size}, checkpoint {config.vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    hf, ours = hf.to(device).eval(), ours.to(device).eval()
    with torch.no_grad():
        expected = hf(input_ids=input_ids).logits  # (B, T, V)
        actual = ours({"input_ids": input_ids})  # (B, T, V)
    return (expected - actual).abs().max().item()


@cli_errors(OSError)
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmhift.convert.compare_logits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir")
    parser.add_argument("checkpoint")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="model config fields, as for composer_to_hf")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    difference = max_logit_difference(args.hf_dir, args.checkpoint, args.seq_len, overrides=overrides)
    verdict = "OK" if difference <= args.tol else "MISMATCH"
    print(f"max |logits difference| = {difference:.3e} (tolerance {args.tol:.0e}): {verdict}")
    return 0 if difference <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
