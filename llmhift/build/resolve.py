"""The yaml's model section resolved against ``model.pretrained``'s own config: the checkpoint says
what the model is; the yaml may only choose how it runs.

Copying every architecture field into the yaml by hand cost one failed run per field, and a field the
weights' shapes cannot reveal (``rope_theta``, ``rms_norm_eps``, ``rope_scaling``) fell back to a default
when left out: a model trained with rope_theta 1e4 instead of its 1e5 (eval CE 3.10 -> 3.21), silently.
Here the architecture comes from the checkpoint (an HF folder's config.json, or the model config a
Composer checkpoint stores); a yaml field that contradicts it is refused, every such field in one
message, unless it is a legitimate choice of the run (context length, attention kernel, ...), which
wins and is reported in one warning line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from transformers import AutoConfig

from llmhift.build.config import ConfigError
from llmhift.checkpoint.io import MODEL_CONFIG_KEY, is_sharded_checkpoint, stored_metadata
from llmhift.models.hf_adapter import ConversionError, llama_config_from_hf
from llmhift.models.llama import LlamaConfig, architecture, same_value

__all__ = [
    "CHOICE_FIELDS",
    "HF_CHOICE_FIELDS",
    "HF_LOADING_OPTIONS",
    "SHAPE_FIELDS",
    "Resolution",
    "declared_llama_config",
    "resolve_llama_section",
    "resolve_hf_section",
    "resolve_model_section",
]

# What a checkpoint declares that a run may choose otherwise: a yaml value that differs wins, with one
# warning line (a shorter training context, a longer one with rope_scaling). Every other declared field
# is what the weights compute (shapes, tie_word_embeddings, rope_theta, rms_norm_eps, layers_without_*):
# a yaml value that differs is refused.
CHOICE_FIELDS = ("max_seq_len", "rope_scaling")
# The fields a parameter count needs; a dry run prints no size that rests on a default of these.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "intermediate_size")
# Keys of a llama model section that are not LlamaConfig fields.
SECTION_KEYS = ("name", "pretrained", "l0_module", "loss_balance", "focal_gamma")

# hf_causal_lm: yaml keys that are config.json keys override it; these may differ from the folder's.
HF_CHOICE_FIELDS = ("max_position_embeddings", "rope_scaling", "attention_dropout")
# Arguments of ComposerHFCausalLM.from_pretrained that are loading options, not the architecture.
HF_LOADING_OPTIONS = ("torch_dtype", "attn_implementation")
# The config.json keys a dry run prints (those the model's config has).
HF_SHOWN = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
    "tie_word_embeddings",
)  # fmt: skip


@dataclass
class Resolution:
    """A model section resolved against its checkpoint.

    Attributes:
        section (dict): the model section to build from. For ``llama`` every LlamaConfig field is
            filled in, so that the saved config.yaml and every later check see the architecture that
            is built; for ``hf_causal_lm`` the yaml's own keys (the folder's config.json is the rest).
        fields (dict): the resolved architecture, field by field, for printing.
        source (str | None): what declared the architecture (a config.json, a checkpoint's stored
            config), or None when nothing did.
        origin (dict): for each field not taken from ``source``: ``yaml``, ``default``, or
            ``yaml, not the checkpoint's <value>`` for an override.
        overrides (dict): the yaml's values that differ from the checkpoint's and win (CHOICE_FIELDS,
            HF_CHOICE_FIELDS).
        warnings (list[str]): one line per override of a declared value, and per architecture that
            nothing but the yaml vouches for; printed once by whoever reports (train.py, the dry run).
        note (str | None): why the source cannot be read on this machine (``missing_ok``, a dry run).
    """

    section: dict[str, Any]
    fields: dict[str, Any]
    source: str | None = None
    origin: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    note: str | None = None


def declared_llama_config(path: str | Path) -> tuple[dict[str, Any], str] | None:
    """(the LlamaConfig fields a checkpoint declares, where they come from), or None when it declares
    none (a bare state dict, a checkpoint written before checkpoints carried their config).

    An HF folder declares its config.json, a Composer checkpoint, pruned-*.pt or sharded folder the
    model config stored in it; neither declares how the run computes
    (:func:`llmhift.models.llama.architecture` leaves ``RUN_SETTINGS`` out).
    """
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(
                f"model.pretrained: {path} is a folder without config.json: neither a Hugging Face model folder "
                "nor a sharded checkpoint (.metadata); point it at one of those or at a checkpoint file"
            )
        try:
            declared = llama_config_from_hf(json.loads(config_file.read_text())).to_dict()
        except (ValueError, KeyError) as err:  # ConversionError and a malformed json are ValueErrors
            raise ConfigError(f"model.pretrained: {config_file}: {err!s}") from None
        return architecture(declared), str(config_file)
    try:
        stored = stored_metadata(path).get(MODEL_CONFIG_KEY)
    except ConversionError as err:
        raise ConfigError(f"model.pretrained: {err}") from None
    if not stored:
        return None
    return architecture(stored), f"the model config stored in {path}"


def resolve_llama_section(section: Mapping[str, Any], missing_ok: bool = False) -> Resolution:
    """The ``llama`` model section with the checkpoint's architecture filled in and the yaml's fields
    checked against it. ``missing_ok``: a ``model.pretrained`` that is not on this machine gives a
    note and the yaml over llmhift's defaults (a dry run away from the cluster) instead of an error."""
    yaml = {k: v for k, v in section.items() if k not in SECTION_KEYS}
    names = list(LlamaConfig.__dataclass_fields__)  # in declaration order, for a stable message
    unknown = sorted(set(yaml) - set(names))
    if unknown:
        raise ConfigError(f"model: unknown model config key(s) {unknown}; allowed: {sorted(names)}")
    pretrained = section.get("pretrained")
    declared, source, note, warnings = None, None, None, []
    if pretrained and not Path(pretrained).exists():
        if not missing_ok:
            raise ConfigError(f"model.pretrained: {pretrained} does not exist")
        note = f"model.pretrained: {pretrained} does not exist here"
    elif pretrained:
        found = declared_llama_config(pretrained)
        if found is None:
            warnings.append(
                f"model.pretrained: {pretrained} stores no model config, so the architecture is the yaml's: "
                "the weights' shapes are checked, rope_theta, rms_norm_eps and rope_scaling cannot be"
            )
        else:
            declared, source = found
    declared = declared or {}
    differ = [k for k in names if k in yaml and k in declared and not same_value(yaml[k], declared[k])]
    contradictions = [k for k in differ if k not in CHOICE_FIELDS]
    if contradictions:
        listed = ", ".join(f"{k}={yaml[k]!r} (checkpoint: {declared[k]!r})" for k in contradictions)
        raise ConfigError(
            f"model: {len(contradictions)} field(s) contradict {source}: {listed}; remove them from the yaml "
            "(the checkpoint's own values are used), or point model.pretrained at the model you mean"
        )
    origin = {k: "yaml" for k in yaml if k not in declared}
    overrides = {k: yaml[k] for k in differ}  # the choices: every other difference was refused above
    origin.update({k: f"yaml, not the checkpoint's {declared[k]!r}" for k in overrides})
    warnings += [f"model.{k}: {v!r} overrides {declared[k]!r} of {source}" for k, v in overrides.items()]
    try:
        config = LlamaConfig.from_dict({**declared, **yaml})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    fields = config.to_dict()
    origin.update({k: "default" for k in fields if k not in declared and k not in yaml})
    resolved = {k: v for k, v in section.items() if k in ("name", "pretrained")}
    resolved.update(fields)
    for key in ("l0_module", "loss_balance", "focal_gamma"):  # the model's options beside its architecture
        if key in section:
            resolved[key] = section[key]
    return Resolution(resolved, fields, source, origin, overrides, warnings, note)


def resolve_hf_section(section: Mapping[str, Any], missing_ok: bool = False) -> Resolution:
    """The ``hf_causal_lm`` section checked against its folder's config.json: a yaml key that is a
    config key overrides it (transformers' ``from_pretrained(path, key=value)``), which only the
    HF_CHOICE_FIELDS may do with a different value; every other key is a loading option, as before."""
    folder = section.get("pretrained")
    if not folder:
        raise ConfigError("model.pretrained: hf_causal_lm needs a local Hugging Face model folder")
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        message = f"model.pretrained: {folder} holds no config.json: not a local Hugging Face model folder"
        if missing_ok:
            return Resolution(dict(section), {}, note=message)
        raise ConfigError(f"{message} (llmhift never downloads); point it at a folder written by save_pretrained")
    try:
        declared = AutoConfig.from_pretrained(folder, local_files_only=True).to_dict()
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model.pretrained: {config_file}: {err}") from None
    yaml = {k: v for k, v in section.items() if k in declared and k not in ("name", *HF_LOADING_OPTIONS)}
    contradictions = [k for k, v in yaml.items() if k not in HF_CHOICE_FIELDS and v != declared[k]]
    if contradictions:
        listed = ", ".join(f"{k}={yaml[k]!r} (config.json: {declared[k]!r})" for k in contradictions)
        raise ConfigError(
            f"model: {len(contradictions)} field(s) contradict {config_file}: {listed}; remove them from the yaml "
            f"(only {list(HF_CHOICE_FIELDS)} may differ from the model's own config)"
        )
    overrides = {k: v for k, v in yaml.items() if v != declared[k]}
    warnings = [f"model.{k}: {v!r} overrides {declared[k]!r} of {config_file}" for k, v in overrides.items()]
    origin = {k: f"yaml, not the checkpoint's {declared[k]!r}" for k in overrides}
    fields = {k: yaml.get(k, declared[k]) for k in HF_SHOWN if k in declared}
    return Resolution(dict(section), fields, str(config_file), origin, overrides, warnings)


def resolve_model_section(section: Mapping[str, Any], missing_ok: bool = False) -> Resolution:
    """``resolve_llama_section`` or ``resolve_hf_section``, by ``model.name``."""
    if section.get("name") == "hf_causal_lm":
        return resolve_hf_section(section, missing_ok)
    return resolve_llama_section(section, missing_ok)
