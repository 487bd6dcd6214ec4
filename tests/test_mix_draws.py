"""DynamicMixDataset's draws, sample by sample, against the rules its docstring states, written out here
one global sample at a time: proportion changes mid-run, resumption at odd points, 2 ranks, 2 workers.

The sampler is shared by the pretraining and the multi-task loaders and is tuned for speed (it walks
ahead and rewinds when the schedule changes); this pins the stream it must keep producing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from llmhift.datasets.dynamic_streaming import DynamicMixDataset

SIZES = [5, 11, 3]  # tiny sources, so passes (reshuffled permutations) end often
NAMES = ["a", "b", "c"]
BLOCK = 4096  # global samples per seeded block of uniforms: part of the stream's definition


class Ids(DynamicMixDataset):
    """Each sample is its sample id: the stream's plan, without any data."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NAMES, SIZES, **kwargs)

    def _load(self, d: int, sample_id: int) -> dict[str, torch.Tensor]:
        return {"sample": torch.tensor(sample_id)}


def reference(seed: int, schedule: list, n: int) -> list[tuple[int, int]]:
    """(source, sample id) of global samples 0..n-1 by the documented rules, one sample at a time."""
    uniforms, permutations, counts, out = {}, {}, [0] * len(SIZES), []
    for i in range(n):
        block = i // BLOCK
        if block not in uniforms:
            uniforms[block] = np.random.default_rng([seed, 0, block]).random(BLOCK)
        proportion = [p for start, p in schedule if start <= i][-1]
        cum = np.cumsum(np.asarray(proportion, dtype=np.float64))
        d = int((cum <= uniforms[block][i % BLOCK] * cum[-1]).sum())
        k = counts[d]
        counts[d] += 1
        epoch = k // SIZES[d]
        if (d, epoch) not in permutations:
            permutations[d, epoch] = np.random.default_rng([seed, 1, d, epoch]).permutation(SIZES[d])
        out.append((d, int(permutations[d, epoch][k % SIZES[d]])))
    return out


def rank_batches(stream: list, first: int, batches: int, batch_size: int, world: int, rank: int) -> list:
    """A rank's batches from global sample ``first`` on: it takes every ``world``-th sample of each global batch."""
    G = batch_size * world
    return [[stream[first + j * G + b * world + rank] for b in range(batch_size)] for j in range(batches)]


def as_pairs(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    return list(zip(batch["domain_idx"].tolist(), batch["sample"].tolist()))


def take(dataset: Ids, batches: int, workers: int = 0, changes: dict | None = None) -> list:
    """A rank's first ``batches`` batches; ``changes[b]``: a proportion set after ``b`` batches were consumed."""
    loader = DataLoader(dataset, batch_size=dataset.batch_size, num_workers=workers,
                        prefetch_factor=2 if workers else None)  # fmt: skip
    out = []
    for batch in loader:
        out.append(as_pairs(batch))
        if changes and len(out) in changes:
            dataset.set_proportion(changes[len(out)], num_samples=len(out) * dataset.global_batch_size)
        if len(out) == batches:
            return out
    raise AssertionError("the stream ended")


CHANGES = {3: [0.1, 0.1, 0.8], 4: [0.0, 0.5, 0.5], 9: [0.6, 0.2, 0.2], 150: [0.2, 0.0, 0.8], 151: [0.3, 0.3, 0.4]}


@pytest.mark.parametrize("rank", [0, 1])
def test_draws_follow_the_rules_across_changes_and_block_ends(rank):
    # 600 batches of 8 global samples cross the first 4096-sample block of uniforms
    dataset = Ids(batch_size=4, proportion=[0.5, 0.3, 0.2], seed=5, lookahead_batches=2, rank=rank, world_size=2)
    got = take(dataset, 600, changes=CHANGES)
    schedule = dataset.schedule()
    assert [start for start, _ in schedule] == [0] + [8 * (b + 2) for b in CHANGES]
    assert got == rank_batches(reference(5, schedule, 600 * 8), 0, 600, 4, 2, rank)


def test_two_workers_see_each_change_where_the_schedule_puts_it():
    dataset = Ids(batch_size=3, proportion=[0.2, 0.2, 0.6], seed=9, lookahead_batches=5, rank=1, world_size=2)
    got = take(dataset, 40, workers=2, changes={2: [0.7, 0.2, 0.1], 3: [0.1, 0.1, 0.8], 20: [0.3, 0.4, 0.3]})
    schedule = dataset.schedule()
    assert [start for start, _ in schedule] == [0, 6 * 7, 6 * 8, 6 * 25]
    assert got == rank_batches(reference(9, schedule, 40 * 6), 0, 40, 3, 2, 1)


@pytest.mark.parametrize("resume_at", [7 * 8, 13 * 8 + 2, 151 * 8])
@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_at_any_point_continues_the_stream(resume_at, workers):
    kwargs = dict(batch_size=4, proportion=[0.5, 0.3, 0.2], seed=5, lookahead_batches=5, world_size=2)
    first = Ids(rank=0, **kwargs)
    for b, proportion in CHANGES.items():
        first.set_proportion(proportion, num_samples=b * 8)
    state = first.state_dict(resume_at)
    stream = reference(5, first.schedule(), resume_at + 30 * 8)
    assert state["counts"] == np.bincount([d for d, _ in stream[:resume_at]], minlength=3).tolist()
    for rank in (0, 1):
        resumed = Ids(rank=rank, **kwargs)
        resumed.load_state_dict(state)
        assert take(resumed, 30, workers=workers) == rank_batches(stream, resume_at, 30, 4, 2, rank)
