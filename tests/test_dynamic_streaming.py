"""DynamicStreamingDataset: proportions honoured (chi-square), deterministic across workers, ranks
disjoint, reshuffled passes, bounded resumable state, remote shards, and a clean start after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter
from torch.utils.data import DataLoader

from llmhift.datasets.dynamic_streaming import DynamicStreamingDataset

SIZES = {"a": 7, "b": 40, "c": 23}  # tiny domains, so passes end often
DOMAINS = list(SIZES)
L = 4


@pytest.fixture(scope="module")
def mds(tmp_path_factory) -> Path:
    """``<root>/train/<domain>/``; sample j of domain d holds tokens [D*1000 + j, ...] (its identity)."""
    root = tmp_path_factory.mktemp("mds")
    for d, (name, n) in enumerate(SIZES.items()):
        # size_limit small enough that every domain spans several shards
        with MDSWriter(out=str(root / "train" / name), columns={"tokens": "ndarray:uint16:4", "domain": "str"},
                       size_limit=200) as writer:  # fmt: skip
            for j in range(n):
                writer.write({"tokens": np.full(L, d * 1000 + j, dtype=np.uint16), "domain": name})
    return root


def make(mds, **kwargs) -> DynamicStreamingDataset:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("lookahead_batches", 5)
    return DynamicStreamingDataset(str(mds), "train", DOMAINS, **kwargs)


def take(dataset, batches, workers=0, change=None, persistent=False):
    """(domain, sample id) per sample of ``batches`` batches; ``change=(after_batch, proportion)``."""
    loader = DataLoader(dataset, batch_size=dataset.batch_size, num_workers=workers,
                        persistent_workers=persistent, prefetch_factor=2 if workers else None)  # fmt: skip
    out = []
    for b, batch in enumerate(loader):
        out.append([(int(t[0]) // 1000, int(t[0]) % 1000) for t in batch["input_ids"]])
        assert batch["domain_idx"].tolist() == [d for d, _ in out[-1]]
        if change is not None and b + 1 == change[0]:
            dataset.set_proportion(change[1], num_samples=(b + 1) * dataset.global_batch_size)
        if b + 1 == batches:
            return out
    raise AssertionError("the stream ended")


def chi_square_p(counts: np.ndarray, proportion: list[float]) -> float:
    """p-value of Pearson's chi-square goodness-of-fit test (df = domains - 1)."""
    expected = counts.sum() * np.asarray(proportion)
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2.0), torch.tensor(stat / 2.0)))


@pytest.mark.parametrize("workers", [0, 2])
def test_domain_frequencies_follow_the_proportions_before_and_after_a_change(mds, workers):
    before, after = [0.2, 0.5, 0.3], [0.6, 0.1, 0.3]
    dataset = make(mds, batch_size=25, proportion=before, lookahead_batches=5)
    batches = take(dataset, 120, workers=workers, change=(40, after))
    start = 45 * 25  # the change was made after 40 batches and applies 5 batches later
    assert dataset.schedule() == [(0, before), (start, after)]
    domains = np.array([d for batch in batches for d, _ in batch])  # (3000,)
    for segment, proportion in ((domains[:start], before), (domains[start:], after)):
        counts = np.bincount(segment, minlength=3)
        p = chi_square_p(counts, proportion)
        assert p > 0.01, (counts, proportion, p)  # the fixed seed makes this exact, not flaky
        assert chi_square_p(counts, [1 / 3] * 3) < 1e-6  # and the test can tell the mixes apart


def test_same_batches_for_any_worker_count_and_persistent_workers(mds):
    change = (6, [0.1, 0.1, 0.8])
    reference = take(make(mds), 30, change=change)
    assert take(make(mds), 30, change=change) == reference  # reproducible
    assert take(make(mds), 30, workers=2, change=change) == reference
    # persistent workers started before the change still see it (the schedule is in shared memory)
    dataset = make(mds)
    assert take(dataset, 30, workers=2, persistent=True, change=change) == reference
    assert take(make(mds, seed=18), 30, change=change) != reference


def test_a_domain_that_runs_out_starts_a_reshuffled_pass(mds):
    batches = take(make(mds, proportion=[0.9, 0.05, 0.05]), 40)
    ids = [j for batch in batches for d, j in batch if d == 0]
    n = SIZES["a"]
    passes = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
    assert len(passes) >= 10
    assert all(sorted(p) == list(range(n)) for p in passes)  # every pass visits each sample once
    assert len({tuple(p) for p in passes}) > 1  # and in a new order


def test_ranks_are_disjoint_within_each_pass(mds):
    world, batches = 2, 60
    streams = [take(make(mds, rank=r, world_size=world), batches) for r in range(world)]
    # Rank r holds the global samples i % 2 == r of the one-process stream with the same global batch.
    single = [x for batch in take(make(mds, batch_size=4 * world), batches) for x in batch]
    for rank in range(world):
        assert [x for batch in streams[rank] for x in batch] == single[rank::world]
    # so, in global order, every pass of a domain hands each of its samples to exactly one rank
    for d, n in enumerate(SIZES.values()):
        draws = [(j, i % world) for i, (dd, j) in enumerate(single) if dd == d]
        for start in range(0, len(draws) - n + 1, n):
            assert sorted(j for j, _ in draws[start : start + n]) == list(range(n))
        assert {rank for _, rank in draws} == {0, 1}


def test_state_is_small_and_resumes_exactly(mds):
    change = (8, [0.7, 0.2, 0.1])
    full = take(make(mds), 40, change=change)
    dataset = make(mds)
    take(dataset, 12, change=change)
    sizes = [len(repr(dataset.state_dict(n))) for n in (4 * 12, 4 * 400, 4 * 40_000)]
    assert sizes[-1] - sizes[0] <= 4 * 4, sizes  # 3333x the samples: 4 numbers, <= 4 more digits each
    state = dataset.state_dict(4 * 12)
    assert state["num_samples"] == 48 and sum(state["counts"]) == 48
    resumed = make(mds)
    resumed.load_state_dict(state)
    assert resumed.schedule() == dataset.schedule()
    assert take(resumed, 28) == full[12:]
    assert take(resumed, 28, workers=2) == full[12:]
    with pytest.raises(ValueError, match="seed"):
        make(mds, seed=3).load_state_dict(state)


def test_remote_shards_are_fetched_into_local(mds, tmp_path):
    local = tmp_path / "cache"
    remote = make(mds)
    cached = DynamicStreamingDataset(str(local), "train", DOMAINS, batch_size=4, lookahead_batches=5, remote=str(mds))
    assert take(cached, 20, workers=2) == take(remote, 20)
    for d in DOMAINS:  # shards are fetched when first read: only those, each whole
        fetched = {p.name: p.read_bytes() for p in (local / "train" / d).iterdir()}
        assert "index.json" in fetched and len(fetched) > 1
        assert all(data == (mds / "train" / d / name).read_bytes() for name, data in fetched.items())
    assert not list(local.rglob(".*"))  # no temp file left beside them


def test_bad_proportions_and_schedule_are_refused(mds):
    with pytest.raises(ValueError, match="sum to 1"):
        make(mds, proportion=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="3 domains"):
        make(mds, proportion=[0.5, 0.5])
    dataset = make(mds, max_updates=2)
    dataset.set_proportion([0.2, 0.2, 0.6], num_samples=40)
    with pytest.raises(ValueError, match="non-negative"):
        dataset.set_proportion([1.2, -0.2, 0.0], num_samples=80)
    with pytest.raises(ValueError, match="max_updates"):
        dataset.set_proportion([0.2, 0.2, 0.6], num_samples=80)


CRASH_SCRIPT = """
import sys
from torch.utils.data import DataLoader
from llmhift.datasets.dynamic_streaming import DynamicStreamingDataset
ds = DynamicStreamingDataset(sys.argv[1], "train", ["a", "b", "c"], batch_size=4, lookahead_batches=5)
for i, batch in enumerate(DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)):
    if i == 3:
        print("running", flush=True)
        sys.stdin.readline()  # wait here, workers alive, until killed
"""


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_to_clean_and_restarts(mds, tmp_path):
    shm = set(os.listdir("/dev/shm"))
    process = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(mds)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    assert process.stdout.readline().strip() == "running"
    os.killpg(process.pid, signal.SIGKILL)  # the run and its workers, as a crash or `kill -9` would
    process.wait()
    new = set(os.listdir("/dev/shm")) - shm
    # Segments of this pytest process (other tests' live datasets) are not the killed run's.
    left = {n for n in new if (n.startswith("torch_") or "mds" in n) and not n.startswith(f"torch_{os.getpid()}_")}
    assert not left  # nothing left behind for anyone to clean
    assert take(make(mds), 10, workers=2) == take(make(mds), 10)  # and a new run starts normally
