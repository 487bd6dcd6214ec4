"""Reading model weights out of checkpoints and writing outputs atomically, for every converter."""

from __future__ import annotations

import base64
import json
import math
import mmap
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from llmhift.models.hf_adapter import ConversionError, hf_to_llmhift_state_dict
from llmhift.models.llama import architecture, same_value

__all__ = [
    "training_progress",
    "LLMHIFT_KEY",
    "MODEL_CONFIG_KEY",
    "L0_MODULE_KEY",
    "HF_CONFIG_KEY",
    "GENERATION_CONFIG_KEY",
    "TOKENIZER_FILES_KEY",
    "WRITTEN_BY",
    "METADATA_CALLBACK",
    "checked_metadata",
    "metadata_from_state",
    "metadata_state",
    "source_metadata",
    "tokenizer_files",
    "is_sharded_checkpoint",
    "callback_state_key",
    "callback_state_tree",
    "load_checkpoint",
    "map_safetensors",
    "model_state_dict",
    "read_hf_weights",
    "write_hf_weights",
    "read_llama_weights",
    "run_config_beside",
    "stored_metadata",
]

# Where llmhift keeps its own metadata (model config, source HF config, tokenizer files) inside a
# checkpoint dict, beside Composer's `state`.
LLMHIFT_KEY = "llmhift"
# The fields of that metadata, the same wherever it is stored (under LLMHIFT_KEY or METADATA_CALLBACK):
MODEL_CONFIG_KEY = "model_config"  # the model's LlamaConfig.to_dict()
L0_MODULE_KEY = "l0_module"  # a pruning run's L0Module.from_dict arguments
HF_CONFIG_KEY = "hf_config"  # the source HF folder's config.json
GENERATION_CONFIG_KEY = "generation_config"  # the source HF folder's generation_config.json
TOKENIZER_FILES_KEY = "tokenizer_files"  # {file name: bytes} of the tokenizer
WRITTEN_BY = "written_by"  # the command that wrote a single-file output (a converter's marker)
# What train.py's checkpoints carry the same metadata under: Composer stores every callback's
# ``state_dict()`` as ``state.callbacks[<class __qualname__>]`` (file and sharded checkpoints alike), and
# llmhift.callbacks.CheckpointMetadataCallback pins its ``__qualname__`` to this name.
METADATA_CALLBACK = "CheckpointMetadataCallback"
# The one field of that callback state: the metadata as JSON (a single leaf, so that a sharded
# checkpoint's key layout does not depend on which source the model came from; see metadata_state).
_METADATA_FIELD = "json"
# Files of an HF folder that belong to its tokenizer, besides those named tokenizer*.
TOKENIZER_NAMES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A torch distributed-checkpoint folder, as Composer writes with ``state_dict_type: sharded``
    (``ep0-ba6/`` with ``.metadata`` and one ``__R_0.distcp`` per rank; ``latest-rank0.pt`` links to it)."""
    return (Path(path) / ".metadata").is_file()


# Where Composer keeps every callback's ``state_dict()`` in a checkpoint, under its class ``__qualname__``.
_CALLBACKS_PATH = ("state", "callbacks")


def callback_state_key(callback: str, *fields: str) -> str:
    """The flat name a torch distributed checkpoint gives a leaf of callback ``callback``'s state
    (``state.callbacks.<callback>.<fields...>``)."""
    return ".".join((*_CALLBACKS_PATH, callback, *fields))


def callback_state_tree(callback: str, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint-shaped dict that holds ``state`` where Composer keeps ``callback``'s state: what
    ``torch.distributed.checkpoint.load`` reads into when only that state is wanted."""
    tree: dict[str, Any] = {callback: state}
    for key in reversed(_CALLBACKS_PATH):
        tree = {key: tree}
    return tree


def load_checkpoint(path: str | os.PathLike, memory_map: bool = False, model_only: bool = False) -> dict[str, Any]:
    """A Composer checkpoint (``latest-rank0.pt`` or any ``ep*-ba*-rank0.pt``), a sharded checkpoint
    folder, or a bare state dict.

    Composer checkpoints pickle more than tensors (timestamps, RNG states), so this unpickles in full:
    only load checkpoints you trust. ``memory_map=True`` maps a file's tensors instead of reading them
    (``torch.load(mmap=True)``): only those used are read, so the weights of a checkpoint that also holds
    optimizer state cost the weights alone. A sharded folder is read in this process (no process
    group); with ``model_only=True`` only its ``state.model`` tensors are read (what the converters
    need: a 7B pruning checkpoint's weights without its 54 GB of Adam moments), otherwise everything,
    gathered through a temporary file.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _load_sharded_model(path) if model_only else _load_sharded(path, memory_map)
    if not path.is_file():
        raise ConversionError(
            f"checkpoint {path} does not exist or is neither a file nor a sharded checkpoint folder (with .metadata)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=memory_map)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ConversionError(f"{path} is not a readable torch checkpoint: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _load_sharded(folder: Path, memory_map: bool) -> dict[str, Any]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="llmhift-dcp-") as tmp:
        gathered = Path(tmp) / "checkpoint.pt"
        try:
            dcp_to_torch_save(folder, gathered)
        except Exception as err:  # a truncated or foreign folder fails in several ways inside torch
            raise ConversionError(f"{folder} is not a readable sharded checkpoint: {err}") from err
        # a mapped file outlives its deletion with the temporary folder (POSIX)
        return torch.load(gathered, map_location="cpu", weights_only=False, mmap=memory_map)


def _load_sharded_model(folder: Path) -> dict[str, Any]:
    """``{"state": {"model": ...}}`` of a sharded folder: every rank's pieces of each model tensor,
    read into one whole tensor (DCP flattens nested dicts into dotted keys: ``state.model.<name>``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = "state.model."
    try:
        reader = dcp.FileSystemReader(folder)
        saved = reader.read_metadata().state_dict_metadata
        model = {
            key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in saved.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
        }
        if not model:
            raise ConversionError(f"{folder} is a sharded checkpoint without model tensors (no {prefix}* keys)")
        with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"state": {"model": model}}, storage_reader=reader, no_dist=True)
    except ConversionError:
        raise
    except Exception as err:  # a truncated or foreign folder fails in several ways inside torch
        raise ConversionError(f"{folder} is not a readable sharded checkpoint: {err}") from err
    return {"state": {"model": model}}


def training_progress(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """(tokens, batches) a Composer checkpoint was trained for, from its stored timestamp; (None, None)
    for a state dict without one. A sharded folder reads those two values alone, not its tensors."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        timestamp = load_checkpoint(path, memory_map=True).get("state", {}).get("timestamp")
        if not isinstance(timestamp, dict):
            return None, None
        timestamp = timestamp.get("Timestamp", timestamp)  # Composer nests it under its class name
        return tuple(int(timestamp[k]) if timestamp.get(k) is not None else None for k in ("token", "batch"))
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(path)
    keys = [k for k in reader.read_metadata().state_dict_metadata
            if k.startswith("state.timestamp.") and k.rsplit(".", 1)[1] in ("token", "batch")]
    wanted: dict[str, Any] = {}
    for key in keys:  # DCP stores nested dicts under dotted keys: rebuild the nesting it loads into
        *parents, leaf = key.split(".")
        node = wanted
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
    if not keys:
        return None, None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    found = {key.rsplit(".", 1)[1]: value for key, value in _flatten(wanted)}
    return tuple(int(found[k]) if found.get(k) is not None else None for k in ("token", "batch"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        items += _flatten(value, name + ".") if isinstance(value, dict) else [(name, value)]
    return items


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ComposerLlama weights in a checkpoint, whichever of the naming schemes it uses.

    Accepted: Composer's ``state.model`` or a bare state dict, in llmhift's names
    (``model.layers.0.attn.wq.weight``) or Hugging Face's (``model.layers.0.self_attn.q_proj.weight``,
    also under the extra ``model.`` of a wrapped HF model); a DDP ``module.`` prefix is dropped.
    """
    if isinstance(checkpoint.get("state"), dict) and "model" in checkpoint["state"]:
        weights = checkpoint["state"]["model"]
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        weights = checkpoint
    else:
        raise ConversionError(
            f"neither a Composer checkpoint (no state.model) nor a state dict (top-level keys: {sorted(checkpoint)[:8]})"
        )
    weights = _strip_prefix(dict(weights), "module.")
    if any(k.startswith("model.model.") for k in weights):
        weights = _strip_prefix(weights, "model.")
    if "model.embed_tokens.weight" in weights:
        head = weights.get("lm_head.weight")
        # A wrapped HF model saves a tied head as a second key on the embedding's storage.
        tied = head is None or head.data_ptr() == weights["model.embed_tokens.weight"].data_ptr()
        weights = hf_to_llmhift_state_dict(weights, tie_word_embeddings=tied)
    return weights


def _strip_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if weights and all(k.startswith(prefix) for k in weights):
        return {k[len(prefix) :]: v for k, v in weights.items()}
    return weights


# The safetensors format's dtype names.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def map_safetensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, memory-mapped rather than read.

    A tensor's bytes come off the disk when it is first used, so shapes can be checked before any
    weight is read, and a loader that copies one tensor at a time into its model holds one copy of
    the weights, not two (``safetensors.torch.load_file`` copies every tensor up front). The mapping
    is copy-on-write: writing to a tensor never changes the file. The format is simple enough to
    parse here (an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
    shape and byte range, then the data); the file is opened through Python's ``open``, so audit
    hooks (``sys.addaudithook``) see every read, which is how the rank-0-only loading test counts them.
    """
    try:
        with open(file, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # outlives the file object
        (header_bytes,) = struct.unpack("<Q", mapped[:8])
        header = json.loads(mapped[8 : 8 + header_bytes])
    except (OSError, ValueError, struct.error) as err:  # an empty file cannot be mapped: ValueError
        raise ConversionError(f"{file} is not a safetensors file: {err}") from err
    start = 8 + header_bytes
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = math.prod(shape)
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(f"{file}: the header entry of {name} is malformed ({err!r})") from err
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise ConversionError(f"{file}: {name} has dtype {dtype_name}, not one of {sorted(SAFETENSORS_DTYPES)}")
        if begin < 0 or end - begin != count * dtype.itemsize or start + end > len(mapped):
            raise ConversionError(
                f"{file}: {name} claims bytes {begin}..{end}, which do not hold shape {shape}; truncated?"
            )
        if count == 0:  # frombuffer refuses an empty range
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        # frombuffer keeps the mapping alive for as long as any of its tensors lives
        tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin).view(shape)
    return tensors


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF model folder: safetensors (single or sharded) or pytorch_model.bin,
    memory-mapped (read when used)."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = hf_dir / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (hf_dir / single_name).is_file():
            files = [single_name]
        else:
            continue
        weights: dict[str, torch.Tensor] = {}
        for name in files:
            if name.endswith(".safetensors"):
                weights.update(map_safetensors(hf_dir / name))
            else:
                try:
                    weights.update(torch.load(hf_dir / name, map_location="cpu", weights_only=True, mmap=True))
                except Exception as err:  # torch raises several types for a truncated or foreign file
                    raise ConversionError(f"{hf_dir / name} is not a readable torch weights file (truncated?): "
                                          f"{str(err).splitlines()[0]}") from err
        return weights
    raise ConversionError(f"{hf_dir} holds no model.safetensors or pytorch_model.bin (sharded or not)")


def write_hf_weights(weights: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Safetensors in shards of at most ``max_shard_bytes`` plus HF's index when there are several."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in weights.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor.contiguous()
        shard_bytes += size
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_llama_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """ComposerLlama weights from an HF model folder, a sharded checkpoint folder, or a Composer checkpoint /
    state dict file, memory-mapped: each tensor is read from disk when first used."""
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        if not (path / "config.json").is_file():
            raise ConversionError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        tied = bool(json.loads((path / "config.json").read_text()).get("tie_word_embeddings", False))
        return hf_to_llmhift_state_dict(read_hf_weights(path), tie_word_embeddings=tied)
    return model_state_dict(load_checkpoint(path, memory_map=True, model_only=True))


def run_config_beside(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The resolved ``config.yaml`` that ``train.py`` saves in its save folder, if the checkpoint
    sits there (``latest-rank0.pt`` may be a symlink, so both its folder and its target's count)."""
    path = Path(checkpoint)
    for folder in dict.fromkeys((path.parent, path.resolve().parent)):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def tokenizer_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer's files in an HF folder (tokenizer.json, tokenizer.model, special tokens, ...)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and (p.name.startswith("tokenizer") or p.name in TOKENIZER_NAMES)
    }


def metadata_state(meta: dict[str, Any]) -> dict[str, str]:
    """The callback state that carries ``meta`` in a checkpoint: one JSON string, tokenizer files in base64.

    One leaf rather than the nested dict: a torch distributed checkpoint flattens dicts into one key per
    leaf, and Composer's sharded resume loads into the state the new run's callback holds, failing on
    any key the checkpoint lacks; a single leaf keeps the layout the same whatever the source was."""
    encoded = dict(meta)
    if TOKENIZER_FILES_KEY in encoded:
        encoded[TOKENIZER_FILES_KEY] = {
            name: base64.b64encode(content).decode("ascii") for name, content in meta[TOKENIZER_FILES_KEY].items()
        }
    return {_METADATA_FIELD: json.dumps(encoded, sort_keys=True)}


def metadata_from_state(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`metadata_state`."""
    meta = json.loads(state[_METADATA_FIELD])
    if TOKENIZER_FILES_KEY in meta:
        meta[TOKENIZER_FILES_KEY] = {name: base64.b64decode(text) for name, text in meta[TOKENIZER_FILES_KEY].items()}
    return meta


def _sharded_callback_state(folder: Path) -> dict[str, Any] | None:
    """The metadata callback's state in a sharded checkpoint, read alone (no tensor is touched)."""
    import torch.distributed.checkpoint as dcp

    key = callback_state_key(METADATA_CALLBACK, _METADATA_FIELD)
    try:
        reader = dcp.FileSystemReader(folder)
        if key not in reader.read_metadata().state_dict_metadata:
            return None
        state = {_METADATA_FIELD: ""}
        holder = callback_state_tree(METADATA_CALLBACK, state)
        with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(holder, storage_reader=reader, no_dist=True)
    except Exception as err:  # a truncated or foreign folder fails in several ways inside torch
        raise ConversionError(f"{folder} is not a readable sharded checkpoint: {err}") from err
    return state


def _stored(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what train.py's metadata callback stored, what a converter stored under ``LLMHIFT_KEY``)."""
    if is_sharded_checkpoint(path):
        state = _sharded_callback_state(path)
        return (metadata_from_state(state) if state else {}), {}
    if not path.is_file():
        return {}, {}
    checkpoint = load_checkpoint(path, memory_map=True)
    callbacks = checkpoint.get("state", {}).get("callbacks") if isinstance(checkpoint.get("state"), dict) else None
    state = (callbacks or {}).get(METADATA_CALLBACK)
    return (metadata_from_state(state) if state else {}), dict(checkpoint.get(LLMHIFT_KEY) or {})


def stored_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """llmhift's metadata stored inside a checkpoint (``model_config``, and where known ``l0_module``,
    ``hf_config``, ``generation_config``, ``tokenizer_files``), or ``{}`` when it holds none.

    Reads what train.py's checkpoints carry (file or sharded folder, or the ``latest-rank0.pt`` link to
    either) and what the converters write (``save_hf_to_composer``, ``prune_and_save_model``). Tools read
    the model's architecture from here rather than from a yaml that may have changed since the
    checkpoint was written."""
    from_run, from_converter = _stored(Path(path))
    return {**from_run, **from_converter}


# What a model inherits from its source; the source's model and L0 configs, and which command wrote
# it (a converter's output marker), describe the source alone.
INHERITED = (HF_CONFIG_KEY, GENERATION_CONFIG_KEY, TOKENIZER_FILES_KEY)


def source_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What a model built from ``path`` (``model.pretrained``) inherits: an HF folder's ``hf_config``,
    ``generation_config`` and ``tokenizer_files``; a checkpoint's own stored ones, carried forward. The
    model and L0 configs are the new model's own, so they are not inherited."""
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        if not (path / "config.json").is_file():
            raise ConversionError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        meta: dict[str, Any] = {HF_CONFIG_KEY: json.loads((path / "config.json").read_text())}
        if (path / "generation_config.json").is_file():
            meta[GENERATION_CONFIG_KEY] = json.loads((path / "generation_config.json").read_text())
        files = tokenizer_files(path)
        if files:
            meta[TOKENIZER_FILES_KEY] = files
        return meta
    return {k: v for k, v in stored_metadata(path).items() if k in INHERITED}


def _contradictions(stored: dict[str, Any], claimed: dict[str, Any], prefix: str) -> list[str]:
    """``prefix.field=claimed (checkpoint: stored)`` for every field both set to different values."""
    found = []
    for key, value in claimed.items():
        if value is None or key not in stored:
            continue
        if isinstance(value, dict) and isinstance(stored[key], dict):
            found += _contradictions(stored[key], value, f"{prefix}{key}.")
        elif not same_value(value, stored[key]):
            found.append(f"{prefix}{key}={value} (checkpoint: {stored[key]})")
    return found


def checked_metadata(checkpoint: str | os.PathLike, config_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The checkpoint's metadata with its ``model_config`` (and ``l0_module``), checked against the run config.

    The run config is ``config_path`` or else the ``config.yaml`` train.py saved beside the checkpoint.
    A checkpoint that stores its config is described by it, and a run config that contradicts it is
    refused, naming every contradicting field: it was written for another model (a later run into the
    same folder, say). A converter's output (``pruned-*.pt``) is checked only against an explicit
    ``config_path``: the config.yaml beside it describes the run it was made from, not it. An older
    checkpoint without a stored config takes its model and l0_module sections from the run config.
    """
    from_run, from_converter = _stored(Path(checkpoint))
    meta = {**from_run, **from_converter}
    if config_path is not None:
        where, fix = f"config={config_path}", "drop config= (the checkpoint carries its own config) or fix that file"
        run_config = yaml.safe_load(Path(config_path).read_text()) or {}
    else:
        where = f"the config.yaml beside {checkpoint}"
        fix = "it was written for another model (a later run into that folder?): move it aside"
        described = MODEL_CONFIG_KEY not in from_converter  # a converter's output is described by itself alone
        run_config = run_config_beside(checkpoint) if described else {}
    section = dict(run_config.get("model") or {})
    l0_section = section.pop("l0_module", None)
    claimed = architecture(section)
    if MODEL_CONFIG_KEY not in meta:  # written before checkpoints carried their config
        if section.get("name") == "llama":
            meta[MODEL_CONFIG_KEY] = claimed
        if l0_section is not None:
            meta[L0_MODULE_KEY] = l0_section
        return meta
    found = _contradictions(meta[MODEL_CONFIG_KEY], claimed, "model.")
    if l0_section is not None:
        if L0_MODULE_KEY not in meta:
            found.append("model.l0_module (the checkpoint is not a pruning run's)")
        else:
            shaping = {k: l0_section[k] for k in ("target_model", "pruning_modules") if k in l0_section}
            found += _contradictions(meta[L0_MODULE_KEY], shaping, "model.l0_module.")
    if found:
        raise ConversionError(f"{where} contradicts the config stored in {checkpoint}: {', '.join(found)}; {fix}")
    return meta
