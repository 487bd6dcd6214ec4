"""Greedy generation with plain transformers from a local HF folder: ``python scripts/generate.py HF_DIR PROMPT...``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

__all__ = ["generate", "main"]


def generate(model_dir: str, prompts: Sequence[str], max_new_tokens: int = 40) -> list[str]:
    """Each prompt continued greedily by the model in ``model_dir`` (offline: a local folder only)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids  # [1, T]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id or 0)  # [1, T + new]
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return texts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", help="a Hugging Face model folder (config.json, weights, tokenizer)")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    for prompt, text in zip(args.prompts, generate(args.model_dir, args.prompts, args.max_new_tokens)):
        print(f"--- prompt: {prompt!r}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
