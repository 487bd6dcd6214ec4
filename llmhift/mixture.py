"""The contract between a dataset that samples domains in proportions that can change and the callback
that changes them: a base module, so that neither side imports the other."""

from __future__ import annotations

import math
from typing import Protocol, Sequence, runtime_checkable

__all__ = ["DomainMixDataset", "check_proportion"]


def check_proportion(proportion: Sequence[float], domains: Sequence[str], what: str = "proportion") -> list[float]:
    """``proportion`` as floats, or a ValueError naming ``what``: one non-negative value per domain, sum 1."""
    values = [float(p) for p in proportion]
    if len(values) != len(domains):
        raise ValueError(f"{what}: {len(values)} values for {len(domains)} domains {list(domains)}")
    if any(not math.isfinite(p) or p < 0 for p in values):
        raise ValueError(f"{what}: values must be finite and non-negative, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"{what}: values must sum to 1, got {values} (sum {sum(values):.6g})")
    return values


@runtime_checkable
class DomainMixDataset(Protocol):
    """What :class:`~llmhift.callbacks.dynamic_loading.DynamicLoadingCallback` needs of the train dataset
    (:class:`~llmhift.datasets.dynamic_streaming.DynamicStreamingDataset` is one)."""

    domains: list[str]

    @property
    def proportion(self) -> list[float]:
        """The latest proportions, in the order of ``domains``."""

    def set_proportion(self, proportion: Sequence[float], num_samples: int) -> int:
        """Mixes by ``proportion`` from some global sample after ``num_samples``; returns that sample."""
