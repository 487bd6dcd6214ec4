"""Hugging Face LLaMA <-> llmhift weight names and configs: one declarative map, its inverse derived."""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping

import torch

from llmhift.errors import UserError
from llmhift.models.llama import LlamaConfig, LlamaModel

__all__ = [
    "ConversionError",
    "HF_TO_LLMHIFT",
    "hf_to_llmhift_state_dict",
    "llmhift_to_hf_state_dict",
    "llama_config_from_hf",
    "hf_config_from_llama",
    "updated_hf_config",
    "HF_CONFIG_FIELDS",
    "infer_llama_config",
    "check_state_dict_matches",
]


class ConversionError(UserError, ValueError):
    """A checkpoint or config that cannot be converted; the message names the key and the fix."""


# `{}` stands for a layer index; None marks HF keys that carry nothing to keep (cached rope tables).
# Keys of llmhift's side are those of ComposerLlama.state_dict() (the LlamaModel sits at `model.`).
HF_TO_LLMHIFT: dict[str, str | None] = {
    "model.embed_tokens.weight": "model.tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "model.layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "model.layers.{}.attn.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "model.layers.{}.attn.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "model.layers.{}.attn.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.attn.wo.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.w_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.w_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.w_down.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "model.lm_head.weight",
}
LLMHIFT_TO_HF: dict[str, str] = {ours: hf for hf, ours in HF_TO_LLMHIFT.items() if ours is not None}

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def _compile(mapping: Mapping[str, str | None]) -> list[tuple[re.Pattern, str | None]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in mapping.items()]


_HF_PATTERNS = _compile(HF_TO_LLMHIFT)
_LLMHIFT_PATTERNS = _compile(LLMHIFT_TO_HF)


def _rename(
    state_dict: Mapping[str, torch.Tensor], patterns: list[tuple[re.Pattern, str | None]], side: str
) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        for pattern, target in patterns:
            match = pattern.match(key)
            if match:
                if target is not None:
                    renamed[target.replace("{}", match.group(1)) if match.groups() else target] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else "")
        raise ConversionError(
            f"{len(unmapped)} key(s) are not {side} LLaMA weights: {shown}. "
            "Is this a checkpoint of another architecture?"
        )
    return renamed


def hf_to_llmhift_state_dict(
    state_dict: Mapping[str, torch.Tensor], tie_word_embeddings: bool
) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM weights -> ComposerLlama weights; every key is mapped or named in an error."""
    hf = dict(state_dict)
    if tie_word_embeddings and "lm_head.weight" in hf:
        # In-memory HF state dicts list the tied head separately; it must be the embedding itself.
        head = hf.pop("lm_head.weight")
        if not torch.equal(head, hf["model.embed_tokens.weight"]):
            raise ConversionError(
                "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
            )
    return _rename(hf, _HF_PATTERNS, "Hugging Face")


def llmhift_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComposerLlama weights -> HF LlamaForCausalLM weights (a tied head stays implicit, as HF saves it)."""
    return _rename(state_dict, _LLMHIFT_PATTERNS, "llmhift")


def llama_config_from_hf(hf_config: Mapping[str, Any]) -> LlamaConfig:
    """An HF config.json (as a dict) -> LlamaConfig, refusing features llmhift's decoder lacks."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"model_type {model_type!r} is not a LLaMA-family decoder llmhift converts "
            f"(supported: {SUPPORTED_MODEL_TYPES}); use llmhift.models.hf_causal_lm for other models"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ConversionError(f"{flag}=true is not supported by llmhift's LLaMA decoder")
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise ConversionError(f"hidden_act={activation!r} is not supported; llmhift's MLP is SwiGLU (silu)")
    window = hf_config.get("sliding_window")
    max_positions = hf_config.get("max_position_embeddings", 4096)
    if window is not None and window < max_positions:
        warnings.warn(
            f"sliding_window={window} is ignored: llmhift attends over the whole sequence, which is "
            f"identical only for sequences up to {window} tokens",
            stacklevel=2,
        )
    heads = hf_config["num_attention_heads"]
    rope_theta, rope_scaling = _rope_settings(hf_config)
    return LlamaConfig(
        vocab_size=hf_config["vocab_size"],
        d_model=hf_config["hidden_size"],
        n_layers=hf_config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        intermediate_size=hf_config["intermediate_size"],
        max_seq_len=max_positions,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )


def _rope_settings(hf_config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either spelling of config.json: transformers < 5 writes
    ``rope_theta`` and ``rope_scaling`` at the top level; 5.x folds both into one ``rope_parameters``
    dict. Reading only the old keys would silently fall back to theta 10000 on a 5.x checkpoint."""
    parameters = hf_config.get("rope_parameters")
    if not parameters:
        return float(hf_config.get("rope_theta", 10000.0)), hf_config.get("rope_scaling")
    scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    default = scaling.get("rope_type", scaling.get("type", "default")) == "default"
    return float(parameters.get("rope_theta", 10000.0)), None if default else scaling


# config.json's fields that LlamaConfig models, and the LlamaConfig field each one holds.
HF_CONFIG_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "intermediate_size": "intermediate_size", "max_position_embeddings": "max_seq_len", "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling", "rms_norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings",
}  # fmt: skip


def updated_hf_config(base: Mapping[str, Any], config: LlamaConfig) -> dict[str, Any]:
    """The source's config.json ``base`` with only the fields ``config`` changes (a pruned shape, a
    rope_scaling chosen for context extension); every other field, and the source's own spelling of
    an unchanged one (``rope_theta: 100000.0``, extra rope_scaling keys), stays as the source had it.

    ``max_position_embeddings`` stays the source's unless ``config.max_seq_len`` exceeds it: training
    on shorter sequences than the model reaches does not shorten its reach."""
    hf = dict(base)
    source = llama_config_from_hf({k: v for k, v in hf.items() if k != "sliding_window"})
    for hf_key, field in HF_CONFIG_FIELDS.items():
        value = getattr(config, field)
        if getattr(source, field) == value or (field == "max_seq_len" and value < source.max_seq_len):
            continue
        hf[hf_key] = value
    if "head_dim" not in hf and config.head_dim * config.n_heads != config.d_model:
        hf["head_dim"] = config.head_dim  # HF would derive hidden_size // num_attention_heads
    return hf


def hf_config_from_llama(config: LlamaConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """LlamaConfig -> an HF LlamaConfig dict. With ``base`` (the source's own config.json, when known) it is
    the source's config updated where ``config`` differs (:func:`updated_hf_config`): token ids,
    ``max_position_embeddings`` and fields llmhift does not model stay. Without, it is inferred from
    ``config`` alone."""
    missing = {"attention": config.layers_without_attn, "MLP": config.layers_without_mlp}
    for sublayer, layers in missing.items():
        if layers:
            raise ConversionError(
                f"layers {layers} have no {sublayer} sublayer (pruned away entirely), which Hugging Face's "
                "LlamaForCausalLM cannot express; keep training it with llmhift (ComposerLlama loads it), "
                "or prune without head_layer/mlp in pruning_modules so every layer keeps both sublayers"
            )
    if base:
        hf = updated_hf_config(base, config)
        hf.update(architectures=["LlamaForCausalLM"], model_type="llama")
        hf.pop("sliding_window", None)
        return hf
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def infer_llama_config(
    state_dict: Mapping[str, torch.Tensor], known: Mapping[str, Any] | None = None
) -> LlamaConfig:
    """A LlamaConfig from ComposerLlama weights' shapes, completed by ``known`` fields.

    Shapes fix everything except how the query width splits into heads; ``known`` (a stored model
    config or the user's overrides) says it, else LLaMA's head size of 128 is assumed when it fits.
    Whatever ``known`` claims is then checked against the shapes.
    """
    known = dict(known or {})
    if "model.tok_embeddings.weight" not in state_dict:
        raise ConversionError("no model.tok_embeddings.weight: this is not a ComposerLlama state dict")
    vocab_size, d_model = state_dict["model.tok_embeddings.weight"].shape
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"^model\.layers\.(\d+)\.", k))}
    if not layer_ids or layer_ids != set(range(max(layer_ids) + 1)):
        raise ConversionError(f"decoder layers are not numbered 0..L-1: found {sorted(layer_ids)}")
    # A layer may lack a sublayer that pruning removed; the shapes come from any layer that has it.
    without_attn = sorted(i for i in layer_ids if f"model.layers.{i}.attn.wq.weight" not in state_dict)
    without_mlp = sorted(i for i in layer_ids if f"model.layers.{i}.mlp.w_gate.weight" not in state_dict)
    attn_layer = min(set(layer_ids) - set(without_attn), default=None)
    mlp_layer = min(set(layer_ids) - set(without_mlp), default=None)
    if attn_layer is None or mlp_layer is None:
        raise ConversionError("no layer keeps an attention or no layer keeps an MLP: no shape to infer from")
    q_width = state_dict[f"model.layers.{attn_layer}.attn.wq.weight"].shape[0]
    kv_width = state_dict[f"model.layers.{attn_layer}.attn.wk.weight"].shape[0]
    head_dim = known.get("head_dim")
    if head_dim is None and known.get("n_heads"):
        head_dim = q_width // known["n_heads"]
    if head_dim is None:
        if q_width % 128 or kv_width % 128:
            raise ConversionError(
                f"cannot tell the head count from a query width of {q_width}: pass n_heads=... (or head_dim=...)"
            )
        head_dim = 128
    inferred = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=len(layer_ids),
        n_heads=q_width // head_dim,
        n_kv_heads=kv_width // head_dim,
        head_dim=head_dim,
        intermediate_size=state_dict[f"model.layers.{mlp_layer}.mlp.w_gate.weight"].shape[0],
        tie_word_embeddings="model.lm_head.weight" not in state_dict,
        layers_without_attn=without_attn,
        layers_without_mlp=without_mlp,
    )
    for key, value in known.items():
        if key in inferred and inferred[key] != value:
            raise ConversionError(
                f"{key}={value} contradicts the weights, whose shapes give {key}={inferred[key]}"
            )
    try:
        config = LlamaConfig.from_dict({**known, **inferred})
    except (TypeError, ValueError) as err:
        raise ConversionError(str(err)) from err
    check_state_dict_matches(state_dict, config)
    return config


def check_state_dict_matches(state_dict: Mapping[str, torch.Tensor], config: LlamaConfig) -> None:
    """Every expected key present with its exact shape, nothing extra: the strict check, with names."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlamaModel(config).state_dict(prefix="model.").items()}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ConversionError(f"state dict does not fit the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != tuple(shape):
            raise ConversionError(f"{key} has shape {tuple(state_dict[key].shape)}, the config needs {tuple(shape)}")
