"""Where HiFT's inactive parameters' optimizer state waits between their turns: host memory or a file,
moved on a CUDA side stream, DTensor shards kept sharded, and read back from sharded checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import empty as dtensor_empty

from llmhift.atomic import NoSpaceError, is_no_space
from llmhift.checkpoint.io import callback_state_key, callback_state_tree, is_sharded_checkpoint

__all__ = ["Parked", "park", "unpark", "to_host", "to_device", "read_sharded"]

Parked = dict[str, Any] | Path  # one parameter's optimizer state: its tensors, or the file holding them


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _held(value: Any) -> bool:
    """Whether a state entry is memory worth moving: any tensor with a dimension, whatever its shape
    (Adam's and Lion's moments, SGD's momentum buffer, Adafactor's factored row and column statistics,
    bitsandbytes' 8-bit moments, block absmax and quantization maps). Zero-dimensional ones (a step
    counter) and plain objects stay where the optimizer put them."""
    return torch.is_tensor(value) and value.dim() > 0


def to_host(tensors: dict[str, Any], p: torch.Tensor, stream: Optional[torch.cuda.Stream]) -> dict[str, Any]:
    """Every state tensor (:func:`_held`) moves to the host on ``stream``. A DTensor moves its local
    shard and stays a DTensor. Without a stream (CPU runs) "parked" and "active" share one memory:
    nothing moves."""
    if stream is None or p.device.type != "cuda":
        return tensors
    host = {}
    with torch.cuda.stream(stream):
        for key, value in tensors.items():
            if _held(value) and value.is_cuda:
                moved = value.to("cpu", non_blocking=True)  # non-blocking to the host: pinned memory
                _local(value).record_stream(stream)  # freed only once the copy has run
                value = moved
            host[key] = value
    return host


def to_device(tensors: Optional[dict[str, Any]], p: torch.Tensor,
              stream: Optional[torch.cuda.Stream]) -> Optional[dict[str, Any]]:
    """The inverse of :func:`to_host`: back to ``p``'s device, on ``stream`` (so that the next group's
    copy overlaps the current step)."""
    if not tensors or stream is None or p.device.type != "cuda":
        return tensors
    restored = {}
    with torch.cuda.stream(stream):
        for key, value in tensors.items():
            if _held(value) and not value.is_cuda:
                value = value.to(p.device, non_blocking=True)
                _local(value).record_stream(torch.cuda.current_stream(p.device))
            restored[key] = value
    return restored


def park(tensors: dict[str, Any], p: torch.Tensor, stream: Optional[torch.cuda.Stream],
         file: Optional[Path] = None) -> Parked:
    """Parks ``p``'s optimizer state in host memory, or in ``file`` (an ``offload_dir`` file)."""
    tensors = to_host(tensors, p, stream)
    if file is None:
        return tensors
    try:  # scratch space, rewritten at each park: no need for atomic writes
        with file.open("wb") as f:  # a Python file: a full disk surfaces as ENOSPC, not "write failed"
            torch.save(tensors, f)
    except (OSError, RuntimeError) as err:
        if is_no_space(err):
            needs = sum(t.numel() * t.element_size() for t in tensors.values() if torch.is_tensor(t))
            raise NoSpaceError(file.parent, needs) from None
        raise
    return file


def unpark(parked: Optional[Parked]) -> Optional[dict[str, Any]]:
    """The tensors of a parked state (read back from its file if it has one), or ``None``."""
    if isinstance(parked, Path):
        return torch.load(parked, map_location="cpu", weights_only=True)
    return parked


def read_sharded(folder: Optional[str], owner: str, field: str, keys: list[list[str]],
                 params: dict[str, nn.Parameter]) -> dict[str, dict[str, Any]]:
    """Reads the state ``{name: {key: tensor}}`` that callback ``owner`` keeps under ``field`` out of a
    sharded (torch distributed) checkpoint, for the ``[name, key]`` pairs in ``keys``: each tensor laid
    out like this run's parameter ``params[name]`` (a DTensor sharded as it is, whatever the saving world
    size), plain objects as saved."""
    if folder is None or not is_sharded_checkpoint(folder):
        raise ValueError(f"load_path: HiFT reads its parked optimizer state from the sharded checkpoint's local "
                         f"folder, and {folder!r} is none; download the checkpoint and load it from disk")
    reader = dcp.FileSystemReader(folder)
    saved = reader.read_metadata().state_dict_metadata
    template: dict[str, dict[str, Any]] = {}
    for name, key in keys:
        meta, p = saved[callback_state_key(owner, field, name, key)], params[name]
        if isinstance(meta, BytesStorageMetadata):
            value = None  # a plain object: DCP replaces it
        elif isinstance(p, DTensor) and tuple(meta.size) == tuple(p.shape):
            value = torch.empty_like(p, dtype=meta.properties.dtype)  # sharded like its parameter
        elif isinstance(p, DTensor) and len(meta.size) == p.dim():
            # state derived from a sharded gradient (Adafactor's row/column statistics: grad.new_zeros)
            # is a DTensor on the parameter's mesh and placements
            value = dtensor_empty(tuple(meta.size), dtype=meta.properties.dtype, device_mesh=p.device_mesh,
                                  placements=p.placements)
        else:
            value = torch.empty(meta.size, dtype=meta.properties.dtype)
        template.setdefault(name, {})[key] = value
    dcp.load(callback_state_tree(owner, {field: template}), storage_reader=reader)
    return template
