"""A multi-domain MDS dataset whose domain proportions can change during training, reproducibly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json
from streaming.base.storage.download import CloudDownloader
from torch.utils.data import IterableDataset, get_worker_info

from llmhift.atomic import atomic_replace
from llmhift.mixture import check_proportion

__all__ = ["DynamicMixDataset", "DynamicStreamingDataset", "check_proportion"]

_BLOCK = 4096  # global samples per seeded block of domain draws (any fixed size works; it is part of the seed)
_DRAW_STREAM, _SHUFFLE_STREAM = 0, 1  # keep the two random streams of one seed apart
_AHEAD = 2048  # global samples a worker walks at once: numpy's fixed cost per call is paid once per window


def _fetch(remote: str, local: Path) -> None:
    """Copies ``remote`` to ``local`` with streaming's downloaders unless it is there; atomic, so
    concurrent workers and ranks may race on the same file and a crash leaves no half file."""
    if local.is_file():
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    downloader = CloudDownloader.get(remote)
    try:
        with atomic_replace(local) as tmp:
            downloader.download(remote, str(tmp))
    finally:
        downloader.clean_up()


class _Domain:
    """One domain's MDS folder: shard readers over ``local``, shards fetched from ``remote`` on first use."""

    def __init__(self, local: Path, remote: str | None) -> None:
        self.local, self.remote = local, remote
        if remote:
            _fetch(f"{remote}/index.json", local / "index.json")
        if not (local / "index.json").is_file():
            raise FileNotFoundError(f"{local / 'index.json'} does not exist and no remote was given")
        shards = json.loads((local / "index.json").read_text())["shards"]
        self.readers = [reader_from_json(str(local), None, shard) for shard in shards]
        self.ends = np.cumsum([reader.samples for reader in self.readers])  # (shards,) sample id bounds
        self.size = int(self.ends[-1]) if len(self.ends) else 0
        self._ready: set[int] = set()

    def _prepare(self, s: int) -> None:
        reader = self.readers[s]
        for raw, zipped in reader.file_pairs:
            raw_path = self.local / raw.basename
            if raw_path.is_file():
                continue
            if self.remote is None:
                raise FileNotFoundError(f"{raw_path} is missing and no remote was given")
            if zipped is None:
                _fetch(f"{self.remote}/{raw.basename}", raw_path)
                continue
            zip_path = self.local / zipped.basename
            _fetch(f"{self.remote}/{zipped.basename}", zip_path)
            with atomic_replace(raw_path) as tmp:
                tmp.write_bytes(decompress(reader.compression, zip_path.read_bytes()))
        self._ready.add(s)

    def get(self, sample_id: int) -> dict[str, Any]:
        s = int(np.searchsorted(self.ends, sample_id, side="right"))
        if s not in self._ready:
            self._prepare(s)
        start = int(self.ends[s - 1]) if s else 0
        return self.readers[s].get_item(sample_id - start)


class _Walk:
    """The global sample stream from a position on: the domain of each sample and which draw of that
    domain it is (its ``k``; the domain's sample is then a seeded permutation of pass ``k // n``)."""

    def __init__(self, seed: int, position: int, counts: np.ndarray) -> None:
        self.seed, self.position, self.counts = seed, position, counts.astype(np.int64).copy()
        self._block: tuple[int, np.ndarray] | None = None

    def _uniforms(self, a: int, b: int) -> np.ndarray:
        block = a // _BLOCK
        if self._block is not None and self._block[0] == block and (b - 1) // _BLOCK == block:
            return self._block[1][a - block * _BLOCK : b - block * _BLOCK]  # the usual case: one cached block
        parts = []
        for block in range(a // _BLOCK, (b - 1) // _BLOCK + 1):
            if self._block is None or self._block[0] != block:
                rng = np.random.default_rng([self.seed, _DRAW_STREAM, block])
                self._block = (block, rng.random(_BLOCK))
            lo, hi = max(a, block * _BLOCK), min(b, (block + 1) * _BLOCK)
            parts.append(self._block[1][lo - block * _BLOCK : hi - block * _BLOCK])
        return np.concatenate(parts)

    def advance(self, to: int, starts: np.ndarray, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Domains and draw numbers of global samples ``[position, to)`` under the schedule ``starts``
        with cumulative proportions ``cum`` (U, D); moves the position to ``to``."""
        a = self.position
        index = np.arange(a, to)  # (n,)
        entry = np.searchsorted(starts, index, side="right") - 1  # (n,) schedule entry in force
        rows = cum[entry]  # (n, D)
        # u * total < total, so the last domain with a positive share is the highest one drawn and
        # a zero share is never drawn, whatever the rounding of the cumulative sum.
        target = self._uniforms(a, to) * rows[:, -1]  # (n,)
        domains = (rows <= target[:, None]).sum(axis=1)  # (n,) searchsorted row by row
        # a sample's draw number: its domain's count so far plus the earlier samples of that domain here
        seen = np.cumsum(domains[:, None] == np.arange(cum.shape[1]), axis=0)  # (n, D)
        draws = self.counts[domains] + seen[np.arange(len(index)), domains] - 1  # (n,)
        if len(index):
            self.counts += seen[-1]
        self.position = to
        return domains, draws


class DynamicMixDataset(IterableDataset):
    """Samples from several sources (domains, or instruction tasks) mixed by proportions that may change
    mid-run: the sampler both :class:`DynamicStreamingDataset` and the multi-task instruction loader use.
    A subclass gives each source's size and its :meth:`_load` (sample id -> item without ``domain_idx``).

    Args:
        domains (Sequence[str]): the source names, in metric order (``domain_idx``).
        sizes (Sequence[int]): samples per source (each > 0).
        batch_size, proportion, seed, lookahead_batches, max_updates, rank, world_size: as for
            :class:`DynamicStreamingDataset`.
    """

    def __init__(
        self,
        domains: Sequence[str],
        sizes: Sequence[int],
        batch_size: int,
        proportion: Sequence[float] | None = None,
        seed: int = 17,
        lookahead_batches: int = 32,
        max_updates: int = 4096,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = world_size or (torch.distributed.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        if batch_size < 1 or lookahead_batches < 1 or max_updates < 1:
            raise ValueError(
                f"batch_size ({batch_size}), lookahead_batches ({lookahead_batches}) and max_updates "
                f"({max_updates}) must be positive"
            )
        self.domains, self.batch_size, self.seed = list(domains), batch_size, seed
        self.lookahead_batches = lookahead_batches
        self.sizes = [int(n) for n in sizes]
        if proportion is None:
            proportion = [n / sum(self.sizes) for n in self.sizes]
        D = len(self.domains)
        # Shared before any worker exists; workers (fork or spawn) map the same memory.
        self._starts = torch.zeros(max_updates, dtype=torch.int64).share_memory_()  # (U,) first sample
        self._proportions = torch.zeros(max_updates, D, dtype=torch.float64).share_memory_()  # (U, D)
        self._num_entries = torch.zeros(2, dtype=torch.int64).share_memory_()  # entries, then writes so far
        self._base = torch.zeros(1 + D, dtype=torch.int64).share_memory_()  # position, then counts (D,)
        self._proportions[0] = torch.tensor(check_proportion(proportion, self.domains), dtype=torch.float64)
        self._num_entries[0] = 1
        self._replay: _Walk | None = None  # main process: the walk state_dict advances incrementally
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}
        self._domain_ids = [torch.tensor(d) for d in range(D)]  # shared by samples: collation copies them
        self._schedule_cache: tuple[int, np.ndarray, np.ndarray] | None = None  # (writes, starts, cum)

    def _load(self, d: int, sample_id: int) -> dict[str, torch.Tensor]:
        """Sample ``sample_id`` of source ``d`` as a new dict of tensors (a subclass's job)."""
        raise NotImplementedError

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def schedule(self) -> list[tuple[int, list[float]]]:
        """``[(first global sample, proportions), ...]`` in force now, oldest first."""
        n = int(self._num_entries[0])
        return [(int(s), p.tolist()) for s, p in zip(self._starts[:n], self._proportions[:n])]

    @property
    def proportion(self) -> list[float]:
        """The latest proportions (possibly not yet in force: see :meth:`set_proportion`)."""
        return self._proportions[int(self._num_entries[0]) - 1].tolist()

    def set_proportion(self, proportion: Sequence[float], num_samples: int) -> int:
        """Mixes by ``proportion`` from ``lookahead_batches`` global batches after ``num_samples`` (the
        global samples consumed so far); returns that first global sample. ``num_samples=0`` before
        the first batch sets the initial mix instead."""
        values = torch.tensor(check_proportion(proportion, self.domains), dtype=torch.float64)
        n = int(self._num_entries[0])
        start = num_samples + self.lookahead_batches * self.global_batch_size
        if num_samples == 0 and int(self._base[0]) == 0:
            start = 0  # before the first batch nothing can have been prefetched
        last = int(self._starts[n - 1])
        if start < last:
            raise ValueError(f"num_samples={num_samples} is behind the schedule's last entry at sample {last}")
        if start > last:
            if n == len(self._starts):
                raise ValueError(f"the schedule holds at most max_updates={n} entries; raise max_updates")
            self._starts[n] = start
            n += 1
        self._proportions[n - 1] = values  # written before the count, so a reader never sees a half entry
        self._num_entries[0] = n
        self._num_entries[1] += 1  # last: a reader that sees this write count sees the whole entry
        return start

    def _schedule_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The schedule's starts (U,) and cumulative proportions (U, D), re-read only after a write."""
        writes = int(self._num_entries[1])
        if self._schedule_cache is None or self._schedule_cache[0] != writes:
            n = int(self._num_entries[0])
            cum = np.cumsum(self._proportions[:n].numpy(), axis=1)  # (U, D)
            self._schedule_cache = (writes, self._starts[:n].numpy().copy(), cum)
        return self._schedule_cache[1], self._schedule_cache[2]

    def _permutation(self, d: int, epoch: int) -> np.ndarray:
        """The seeded order of source ``d``'s samples in pass ``epoch`` (the latest pass is cached)."""
        cached = self._permutations.get(d)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, d, epoch])
            cached = (epoch, rng.permutation(self.sizes[d]))
            self._permutations[d] = cached
        return cached[1]

    def _sample_ids(self, domains: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """The sample id of each (domain, draw number) pair, any shape: draw ``k`` of source ``d``
        reads ``perm[k % n_d]`` of pass ``k // n_d``."""
        ids = np.empty_like(draws)
        for d in np.unique(domains).tolist():
            at = np.flatnonzero(domains == d)  # (m,) into the flattened arrays
            k = draws.flat[at]  # (m,)
            epochs = k // self.sizes[d]
            for epoch in np.unique(epochs).tolist():
                sel = epochs == epoch
                ids.flat[at[sel]] = self._permutation(d, epoch)[k[sel] % self.sizes[d]]
        return ids

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        base = self._base.numpy().copy()
        writes = self._num_entries.numpy()  # a view of the shared count: reading it costs no tensor op
        B, W, G, D = self.batch_size, self.world_size, self.global_batch_size, len(self.domains)
        step = workers * G  # global samples from one of this worker's batches to its next
        walk = _Walk(self.seed, int(base[0]), base[1:])
        position = int(base[0])  # where the walk for this worker's next batch starts: its last batch's end
        first = position + worker * G  # this worker's next rank-batch's global batch starts here
        while True:
            # Walk a window of global samples at once (other ranks' and workers' too: the draw counts
            # depend on them) under the schedule read now. A batch is served from the window only
            # while the schedule is unchanged, so every batch is drawn under the schedule in force
            # when it is reached, exactly as walking up to each batch's end just before it would.
            version, start, counts = int(writes[1]), walk.position, walk.counts.copy()
            domains, draws = walk.advance(max(first + G, start + _AHEAD // G * G), *self._schedule_arrays())
            firsts = np.arange(first, walk.position - G + 1, step)  # (nb,) this worker's batches in the window
            mine = firsts[:, None] - start + np.arange(B) * W + self.rank  # (nb, B) window positions
            batch_domains, ids = domains[mine], self._sample_ids(domains[mine], draws[mine])
            for j in range(len(firsts)):
                if j and int(writes[1]) != version:
                    break
                for d, i in zip(batch_domains[j].tolist(), ids[j].tolist()):
                    item = self._load(d, i)
                    item["domain_idx"] = self._domain_ids[d]
                    yield item
                position, first = first + G, first + step
            # rewind to the end of the last batch served: the next window walks on from there
            walk.position = position
            walk.counts = counts + np.bincount(domains[: position - start], minlength=D)

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any]:
        """The position after ``num_samples`` global samples, its draw counts and the schedule.

        ``from_beginning`` is accepted for Composer's call; the stream has one endless epoch, so the
        count is always from its beginning.
        """
        del from_beginning  # one endless epoch: Composer's count is always from the start
        starts, cum = self._schedule_arrays()
        if self._replay is None or self._replay.position > num_samples:
            base = self._base.numpy()
            self._replay = _Walk(self.seed, int(base[0]), base[1:])
        if num_samples < self._replay.position:
            raise ValueError(f"num_samples={num_samples} is before the resumed position {self._replay.position}")
        if num_samples > self._replay.position:
            self._replay.advance(num_samples, starts, cum)
        return {
            "domains": list(self.domains),
            "seed": self.seed,
            "num_samples": num_samples,
            "counts": self._replay.counts.tolist(),
            "schedule": [[s, p] for s, p in self.schedule()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues after ``state['num_samples']`` with the saved schedule; the domains and seed must match."""
        if state["domains"] != self.domains or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data stream has domains {state['domains']} and seed {state['seed']}; "
                f"this dataset has {self.domains} and seed {self.seed}: resume with the same ones"
            )
        schedule = state["schedule"]
        if len(schedule) > len(self._starts):
            raise ValueError(f"the checkpoint's schedule has {len(schedule)} entries; raise max_updates")
        for i, (start, proportion) in enumerate(schedule):
            self._starts[i] = start
            self._proportions[i] = torch.tensor(proportion, dtype=torch.float64)
        self._num_entries[0] = len(schedule)
        self._num_entries[1] += 1
        self._base[0] = state["num_samples"]
        self._base[1:] = torch.tensor(state["counts"], dtype=torch.int64)
        self._replay = None


class DynamicStreamingDataset(DynamicMixDataset):
    """Samples from one MDS folder per domain, mixed by proportions that may change mid-run.

    The order is a pure function of ``(seed, world size, batch size, the proportion schedule)``:

    * Global sample ``i`` (over all ranks) draws its domain from a seeded uniform ``u_i`` and the
      proportions in force at ``i``. The schedule is a list ``[(first_sample, proportions), ...]``.
    * The ``k``-th draw of domain ``d`` reads sample ``perm[k % n_d]`` of a seeded permutation of the
      domain's ``n_d`` samples for pass ``k // n_d``: a domain that runs out starts a reshuffled pass.
    * Rank ``r`` of ``W`` takes the global samples with ``i % W == r``, so within a pass of a domain no
      sample goes to two ranks. Data-loader worker ``w`` of ``K`` yields the rank's batches
      ``w, w + K, ...`` (the order in which the DataLoader collects them).

    :meth:`set_proportion` appends a schedule entry that starts ``lookahead_batches`` global batches
    after the samples consumed so far. The DataLoader never asks a worker for more than
    ``num_workers * prefetch_factor`` batches ahead, so with ``lookahead_batches`` larger than that no
    sample already prefetched can change, and where a change lands never depends on timing.
    Workers read the schedule from shared-memory tensors created here, before any worker starts,
    and re-read it before each batch, so persistent workers see every change. Torch unlinks such
    memory as soon as it is mapped: a killed run leaves nothing in /dev/shm to clean up.

    Resumption: :meth:`state_dict` holds the position, the per-domain draw counts there and the
    schedule; its size grows with the number of proportion changes, not with samples seen. Composer
    saves it in checkpoints and restores it on resume (then it does not spin the loader).

    The stream is endless (no ``__len__``): give ``max_duration`` and intervals in batches, samples or
    tokens, not epochs.

    Args:
        local (str): the folder holding ``<split>/<domain>/`` MDS folders; with ``remote``, the cache.
        split (str): the split folder, ``train``.
        domains (Sequence[str]): the domain folders, in metric order (``domain_idx``).
        batch_size (int): the per-rank batch size the DataLoader uses.
        proportion (Sequence[float], optional): the initial mix. Default: each domain's share of samples.
        remote (str, optional): where ``<split>/<domain>/`` shards live (any streaming remote, or a
            path); fetched into ``local`` on first use. Default: ``None`` (read ``local``).
        seed (int): seeds the domain draws and the permutations. Default: ``17``.
        lookahead_batches (int): global batches between an update and the first sample it changes.
            Must exceed ``num_workers * prefetch_factor``. Default: ``32``.
        max_updates (int): capacity of the shared schedule. Default: ``4096``.
        rank (int, optional), world_size (int, optional): default: the torch distributed ones.

    Example:
        >>> ds = DynamicStreamingDataset("data/mds", "train", ["code", "docs"], batch_size=8)
        >>> loader = DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
        >>> ds.set_proportion([0.7, 0.3], num_samples=8 * 100)  # after 100 batches (one rank)
    """

    def __init__(
        self,
        local: str,
        split: str,
        domains: Sequence[str],
        batch_size: int,
        proportion: Sequence[float] | None = None,
        remote: str | None = None,
        seed: int = 17,
        lookahead_batches: int = 32,
        max_updates: int = 4096,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        root = Path(local) / split
        self._sources = [_Domain(root / d, f"{remote.rstrip('/')}/{split}/{d}" if remote else None) for d in domains]
        sizes = [source.size for source in self._sources]
        empty = [d for d, n in zip(domains, sizes) if n == 0]
        if empty:
            raise ValueError(f"domain(s) {empty} under {root} hold no samples")
        super().__init__(domains, sizes, batch_size, proportion, seed, lookahead_batches, max_updates, rank, world_size)

    def _load(self, d: int, sample_id: int) -> dict[str, torch.Tensor]:
        sample = self._sources[d].get(sample_id)
        return {"input_ids": torch.from_numpy(sample["tokens"].astype(np.int64))}  # (L,), a writable copy
