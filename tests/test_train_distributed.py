"""The demo pretraining run on 2 CPU processes (``composer -n 2``, DDP over gloo): it finishes, writes
its checkpoint, and the two ranks train on disjoint samples.

One launch covers both, and tests/test_dynamic_loading.py reads it too (conftest's ``two_rank_pretrain``):
``tests/scripts/record_batches.py`` runs ``train.main`` itself (the code behind
``composer -n 2 train.py yamls/demo/pretrain.yaml ...``) with a callback that hashes every sample of every
train batch on each rank. The model is shrunk (``TWO_RANK_OVERRIDES``): what is checked here is the
launch, the data and the checkpoint, not what the model learns.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TWO_RANK_BATCHES, TWO_RANK_PER_RANK_BATCH, rank_logs

WORLD_SIZE = 2


def _corpus_counts(mds: Path) -> Counter:
    """How often each sample's content occurs in the train split (the corpus has a few duplicate
    samples, so content hashes are compared as multisets, not as plain sets)."""
    from streaming import LocalDataset  # reads MDS folders directly: no shared memory, no workers

    counts: Counter = Counter()
    for domain in sorted(p.parent for p in (mds / "train").glob("*/index.json")):
        dataset = LocalDataset(str(domain))
        for i in range(len(dataset)):
            # record_batches.sample_hash: sha1 of the int64 token ids (were the two to differ, the
            # "not in the train split" assertion below would say so)
            counts[hashlib.sha1(dataset[i]["tokens"].astype(np.int64).tobytes()).hexdigest()] += 1
    return counts


@pytest.mark.slow
def test_two_rank_run_finishes_and_saves(two_rank_pretrain):
    tmp, result = two_rank_pretrain
    logs = tmp / "logs"
    assert result.returncode == 0, f"{' '.join(result.args)}\n{result.stdout[-6000:]}{rank_logs(logs)}"
    assert (tmp / "ckpt" / "latest-rank0.pt").exists()
    assert (tmp / "ckpt" / "config.yaml").is_file()  # train.py's resolved config, written by rank 0 only
    # train.main ran to its end on every rank, not only on the one whose output the launcher shows
    for rank in range(WORLD_SIZE):
        record = json.loads((tmp / "batches" / f"rank{rank}.json").read_text())
        assert (record["rank"], record["world_size"], record["exit_code"]) == (rank, WORLD_SIZE, 0)


@pytest.mark.slow
def test_ranks_train_on_disjoint_samples(two_rank_pretrain, demo_root):
    tmp, result = two_rank_pretrain
    assert result.returncode == 0, f"{result.stdout[-6000:]}{rank_logs(tmp / 'logs')}"
    records = [json.loads((tmp / "batches" / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert records[0]["pid"] != records[1]["pid"]
    seen = []
    for record in records:
        batches = record["batches"]
        assert len(batches) == TWO_RANK_BATCHES, f"rank {record['rank']}: {len(batches)} train batches"
        assert all(len(batch) == TWO_RANK_PER_RANK_BATCH for batch in batches), [len(b) for b in batches]
        hashes = [h for batch in batches for h in batch]
        assert len(set(hashes)) >= 0.9 * len(hashes), f"rank {record['rank']} repeats samples"
        seen.append(Counter(hashes))

    corpus = _corpus_counts(demo_root / "mds")
    assert all(h in corpus for c in seen for h in c), "a recorded sample is not in the train split"
    # Content seen on both ranks would mean both read the same sample, unless the corpus itself holds
    # that content more than once; then the two ranks together may not exceed its count.
    shared = set(seen[0]) & set(seen[1])
    overdrawn = {h: (seen[0][h], seen[1][h], corpus[h]) for h in shared if seen[0][h] + seen[1][h] > corpus[h]}
    assert not overdrawn, f"samples trained on by both ranks (rank0, rank1, in corpus): {overdrawn}"
    unique_shared = [h for h in shared if corpus[h] == 1]
    assert not unique_shared
    # and the two ranks did not simply start from the same place with different lengths
    assert records[0]["batches"][0] != records[1]["batches"][0]
