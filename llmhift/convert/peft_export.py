"""A ``model.peft`` run's checkpoint back into ``peft`` and ``transformers``: the adapters merged into
a plain HF model, or saved as an adapter folder that ``PeftModel.from_pretrained`` puts on the base.

The checkpoint holds the whole wrapped model (frozen base and adapters, under ComposerHFCausalLM's
``model.`` prefix); its metadata holds the source's ``config.json`` and the adapters' config
(:data:`llmhift.models.peft.PEFT_CONFIG_KEY`), so nothing but the checkpoint is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from llmhift.checkpoint.io import HF_CONFIG_KEY, load_checkpoint
from llmhift.models.hf_adapter import ConversionError
from llmhift.models.peft import PEFT_CONFIG_KEY, PER_BLOCK_TYPES

__all__ = ["rebuild_peft_model", "write_peft_export"]

COMPOSER_PREFIX = "model."  # ComposerHFCausalLM holds the HF (peft) model as `.model`


def rebuild_peft_model(checkpoint_path: str | Path, meta: Mapping[str, Any]) -> nn.Module:
    """The ``peft.PeftModel`` a checkpoint was trained as, with its weights; every tensor of the
    checkpoint must find its parameter and every parameter its tensor."""
    from peft import get_peft_config, get_peft_model

    if HF_CONFIG_KEY not in meta:
        raise ConversionError(f"{checkpoint_path} carries no source config.json (its run had no model.pretrained "
                              "HF folder); a peft export rebuilds the base from it")
    adapters = dict(meta[PEFT_CONFIG_KEY])
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**meta[HF_CONFIG_KEY]))
    base.name_or_path = adapters.get("base_model_name_or_path") or ""  # what the adapter folder names as its base
    model = get_peft_model(base, get_peft_config(adapters))
    state = load_checkpoint(checkpoint_path, memory_map=True, model_only=True)["state"]["model"]
    weights = {k.removeprefix("module.").removeprefix(COMPOSER_PREFIX): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConversionError(f"{checkpoint_path} does not match its stored peft config: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    return model.eval()


def check_mergeable(peft_config: dict[str, Any]) -> None:
    """Refuses ``merge_peft=true`` for a method whose adapters are virtual tokens: nothing to fold into
    the weights. Called before the checkpoint is read, so a refused export costs nothing."""
    kind = peft_config.get("peft_type", "")
    kind = str(getattr(kind, "value", kind)).lower()  # the enum, or its value as the checkpoint's JSON holds it
    if kind not in PER_BLOCK_TYPES:
        raise ConversionError(f"merge_peft=true: {kind} adds virtual tokens, which have no weights to merge into "
                              "the model; export the adapter folder (merge_peft=false)")


def write_peft_export(model: nn.Module, folder: Path, merge: bool, dtype: torch.dtype) -> None:
    """Writes into ``folder`` (the caller's atomic temp folder): with ``merge`` the base model with every
    adapter folded into its weights (``config.json`` + safetensors, loadable by transformers alone),
    otherwise the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    if merge:
        model.merge_and_unload().to(dtype).save_pretrained(folder, safe_serialization=True)
    else:
        model.to(dtype).save_pretrained(folder, safe_serialization=True)
