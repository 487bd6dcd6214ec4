"""Packed token samples from several domains' MDS folders, mixed in their natural proportions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from torch.utils.data import Dataset

from llmhift.errors import UserError

__all__ = ["DataFolderError", "find_domains", "check_shards", "sequence_length", "MultiDomainTextDataset", "EverySample"]


class DataFolderError(UserError, ValueError):
    """A data folder that is missing, empty, or lacks a requested domain."""


def find_domains(local: str | Path, split: str, domains: Sequence[str] | None = None) -> list[str]:
    """The domains of ``<local>/<split>/``: the requested ones, each checked to exist, or all found."""
    root = Path(local) / split
    if not root.is_dir():
        raise DataFolderError(
            f"{root} does not exist; write it with `python -m llmhift.datasets.prepare --out {local} ...`"
        )
    found = sorted(p.name for p in root.iterdir() if (p / "index.json").is_file())
    if not found:
        raise DataFolderError(f"{root} holds no MDS domain folders (no */index.json)")
    missing = [d for d in domains or () if d not in found]
    if missing:
        raise DataFolderError(f"domain(s) {missing} not in {root}; found {found}")
    chosen = found if domains is None else list(domains)
    for domain in chosen:
        check_shards(root / domain)
    return chosen


def check_shards(folder: str | Path) -> None:
    """Every shard that ``index.json`` lists is present with the size it records.

    Why: a copy cut short or a full disk leaves a shorter shard, which streaming reads without
    complaint until a worker reaches its missing samples, hours into the run. A stat per shard
    catches it before the model is built. A compressed shard may be present in either form."""
    folder = Path(folder)
    try:
        shards = json.loads((folder / "index.json").read_text())["shards"]
    except (OSError, ValueError, KeyError) as err:
        raise DataFolderError(f"{folder / 'index.json'} is not a readable MDS index ({err}); rewrite the folder "
                              "with `python -m llmhift.datasets.prepare`") from None
    for shard in shards:
        forms = [form for form in (shard.get("raw_data"), shard.get("zip_data")) if form]
        present = [(folder / form["basename"], form["bytes"]) for form in forms if (folder / form["basename"]).is_file()]
        if not present:
            raise DataFolderError(f"{folder / forms[0]['basename']} is listed in index.json but missing; copy the "
                                  "whole folder again or rewrite it with `python -m llmhift.datasets.prepare`")
        for path, expected in present:
            size = path.stat().st_size
            if size != expected:
                raise DataFolderError(f"{path} has {size} bytes but index.json records {expected} (a truncated "
                                      "copy?); copy the whole folder again or rewrite it with "
                                      "`python -m llmhift.datasets.prepare`")


def sequence_length(folder: str | Path) -> int:
    """The ``L`` of a folder written by prepare (its ``tokens`` column is ``ndarray:<dtype>:<L>``)."""
    index = json.loads((Path(folder) / "index.json").read_text())
    shard = index["shards"][0]
    encoding = shard["column_encodings"][shard["column_names"].index("tokens")]
    return int(encoding.split(":")[-1])


class MultiDomainTextDataset(StreamingDataset):
    """One ``Stream`` per domain folder; each sample becomes ``input_ids`` and ``domain_idx``.

    ``domain_idx`` is the position of the sample's domain in ``domains`` (the order per-domain
    metrics use). Mixing follows the streams' sizes; dynamic proportions are the job of
    :mod:`llmhift.datasets.dynamic_streaming`.

    Args:
        local (str): the folder holding ``<split>/<domain>/``; with ``remote``, the local cache.
        split (str): ``train`` or ``eval``.
        domains (Sequence[str]): the domain folders to read, in metric order.
        batch_size (int): the per-rank batch size (streaming partitions samples by it).
        remote (str, optional): where the shards live (``s3://...``); ``None`` reads ``local``.
        shuffle (bool): shuffle samples (train). Default: ``True``.
        shuffle_seed (int): the shuffle's seed. Default: ``17``.
        **kwargs: passed to ``StreamingDataset`` (for instance ``predownload``, ``cache_limit``).
    """

    def __init__(
        self,
        local: str,
        split: str,
        domains: Sequence[str],
        batch_size: int,
        remote: str | None = None,
        shuffle: bool = True,
        shuffle_seed: int = 17,
        **kwargs: Any,
    ) -> None:
        streams = [
            Stream(
                remote=f"{remote.rstrip('/')}/{split}/{domain}" if remote else None,
                local=str(Path(local) / split / domain),
            )
            for domain in domains
        ]
        super().__init__(streams=streams, shuffle=shuffle, shuffle_seed=shuffle_seed, batch_size=batch_size, **kwargs)
        self.domains = list(domains)
        self._domain_idx = {domain: i for i, domain in enumerate(self.domains)}

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        return {
            "input_ids": torch.from_numpy(sample["tokens"].astype(np.int64)),  # (L,), a writable copy
            "domain_idx": torch.tensor(self._domain_idx[sample["domain"]]),
        }


class EverySample(Dataset):
    """Map-style access to all samples of a StreamingDataset (every rank's, by global index), for a
    ``DistributedSampler`` to split between ranks: what an evaluation over several ranks needs.

    Why: StreamingDataset gives every rank the same number of samples by repeating some when the
    count does not divide, and an evaluation counts the repeats twice (on 2 ranks, one of the demo's
    521 eval samples: enough to move that domain's loss by 4e-5, and the proportions dynamic
    loading derives from it). A DistributedSampler pads the same way, but Composer's eval loop knows
    its padding and leaves it out of the metrics, so each sample counts once whatever the world size.
    """

    def __init__(self, dataset: StreamingDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_samples  # len(StreamingDataset) is one rank's share

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.dataset[idx]
