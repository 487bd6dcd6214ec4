"""What the converter commands share: ``key=value`` arguments, and single-file outputs that know which
command wrote them (so ``overwrite=true`` replaces only its own). No command line lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from llmhift.checkpoint.io import LLMHIFT_KEY, WRITTEN_BY
from llmhift.models.hf_adapter import ConversionError

__all__ = ["file_written_by", "save_torch_file", "parse_overrides"]


def file_written_by(path: Path, command: str) -> bool:
    """Whether ``path`` is a weights-only file that ``command`` wrote: ``state.model`` and llmhift
    metadata naming it, nothing else. The shape test keeps a training checkpoint that inherited the
    metadata from its source from ever counting as one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file at all (torch raises several types): someone else's
        return False
    return (
        isinstance(checkpoint, dict)
        and set(checkpoint) == {"state", LLMHIFT_KEY}
        and set(checkpoint["state"]) == {"model"}
        and isinstance(checkpoint[LLMHIFT_KEY], dict)
        and checkpoint[LLMHIFT_KEY].get(WRITTEN_BY) == command
    )


def save_torch_file(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk surfaces as ``OSError(ENOSPC)`` (given a
    path, torch's C++ writer reports only "file write failed")."""
    with path.open("wb") as f:
        torch.save(obj, f)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` words -> a dict, values read as YAML so numbers, booleans and dicts keep their type."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConversionError(f"expected key=value, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides
