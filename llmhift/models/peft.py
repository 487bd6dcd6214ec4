"""``model.peft``: a transformers causal LM wrapped in a ``peft`` method, from a yaml section.

The section names the method (``type``) and passes every other key to that method's ``peft`` config
class, checked against its fields first, so a typo is one line naming the key rather than a
``TypeError`` from deep inside ``peft``. ``peft`` is an optional dependency (``llmhift[peft]``) and is
imported only when a section asks for it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Mapping, Optional

from torch import nn
from transformers import PreTrainedModel

__all__ = [
    "PEFT_TYPES",
    "PER_BLOCK_TYPES",
    "VIRTUAL_TOKEN_TYPES",
    "QUANTIZATIONS",
    "PEFT_CONFIG_KEY",
    "peft_config",
    "wrap_peft",
    "quantization_config",
    "peft_config_dict",
    "find_peft_model",
]

# Methods whose adapters sit in every block (HiFT can cycle over them), and methods that learn one
# table of virtual tokens in front of the input (one unit: nothing to cycle).
PER_BLOCK_TYPES = ("lora", "adalora", "ia3")
VIRTUAL_TOKEN_TYPES = ("prefix_tuning", "prompt_tuning", "p_tuning")
PEFT_TYPES = (*PER_BLOCK_TYPES, *VIRTUAL_TOKEN_TYPES)
QUANTIZATIONS = ("nf4",)
# llmhift's own keys of the section; the rest belong to the method's config class.
SECTION_KEYS = ("type", "quantize")
# Set by llmhift, not by the yaml: the wrapper always trains a causal LM.
FIXED_FIELDS = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode")
PEFT_CONFIG_KEY = "peft_config"  # checkpoint metadata: the method's config, as peft's to_dict() writes it


def _config_class(kind: str) -> type:
    try:
        import peft
    except ImportError:
        raise ValueError("model.peft: needs the peft package; pip install 'llmhift[peft]'") from None
    classes = {"lora": peft.LoraConfig, "adalora": peft.AdaLoraConfig, "ia3": peft.IA3Config,
               "prefix_tuning": peft.PrefixTuningConfig, "prompt_tuning": peft.PromptTuningConfig,
               "p_tuning": peft.PromptEncoderConfig}
    return classes[kind]


def peft_config(section: Mapping[str, Any], total_steps: Optional[int] = None) -> Any:
    """The ``peft`` config of a ``model.peft`` section, or a ValueError naming the key and the fix.

    AdaLoRA's rank schedule is measured in optimizer steps up to ``total_step``; without one in the
    section it is ``total_steps`` (the run's ``max_duration`` in batches)."""
    kind = section.get("type")
    if kind not in PEFT_TYPES:
        raise ValueError(f"model.peft.type: {kind!r} is not one of {list(PEFT_TYPES)}")
    quantize = section.get("quantize")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"model.peft.quantize: {quantize!r} is not one of {list(QUANTIZATIONS)}; drop it to train "
                         "on full-precision weights")
    cls = _config_class(kind)
    fields = sorted(f.name for f in dataclasses.fields(cls) if f.name not in FIXED_FIELDS)
    kwargs = {k: v for k, v in section.items() if k not in SECTION_KEYS}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"model.peft.{unknown[0]}: not a setting of {cls.__name__} ({kind}); known: {fields}")
    if kind == "adalora" and kwargs.get("total_step") is None:
        if total_steps is None:
            raise ValueError("model.peft.total_step: AdaLoRA's rank schedule needs the run's length in optimizer "
                             "steps; give max_duration in batches (e.g. 1000ba) or set model.peft.total_step")
        kwargs["total_step"] = total_steps
    try:
        return cls(task_type="CAUSAL_LM", **kwargs)
    except (TypeError, ValueError) as err:
        message = str(err).strip().splitlines()[0]
        raise ValueError(f"model.peft: {cls.__name__} refuses these settings: {message}") from None


def quantization_config(section: Mapping[str, Any]) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.peft.quantize`` (QLoRA's 4-bit NF4 base, computed
    in bf16), or None. Needs a CUDA GPU and bitsandbytes (``llmhift[gpu]``)."""
    if section.get("quantize") is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise ValueError("model.peft.quantize: nf4 needs a CUDA GPU (bitsandbytes 4-bit kernels); drop it on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("model.peft.quantize: nf4 needs the bitsandbytes package; pip install 'llmhift[gpu]'")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def wrap_peft(model: PreTrainedModel, section: Mapping[str, Any], total_steps: Optional[int] = None) -> nn.Module:
    """``model`` wrapped in the section's method: only the method's parameters require grad. A base loaded
    4-bit (``quantize``) is first prepared as QLoRA trains it (norms in fp32, input gradients on)."""
    import peft

    config = peft_config(section, total_steps)
    if section.get("quantize") is not None:
        # Gradient checkpointing is the yaml's to choose (model.activation_checkpointing), not peft's.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, config)


def find_peft_model(model: nn.Module) -> Optional[nn.Module]:
    """The ``peft.PeftModel`` inside ``model`` (a ComposerModel holds it as ``.model``), or None."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, PeftModel)), None)


def peft_config_dict(model: nn.Module) -> Optional[dict[str, Any]]:
    """The active adapter's config as JSON-ready values (what ``peft.get_peft_config`` rebuilds it from),
    or None for a model without ``peft``."""
    wrapped = find_peft_model(model)
    if wrapped is None:
        return None
    config = wrapped.peft_config[wrapped.active_adapter].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
