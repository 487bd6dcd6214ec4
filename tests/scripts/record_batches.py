"""Runs ``train.py``'s ``main`` unchanged and records which samples each rank trained on.

Why it exists: ``tests/test_train_distributed.py`` must show that a 2-process run
(``composer -n 2 ...``) both finishes and feeds the ranks disjoint data. The training script cannot
report what its ranks saw, so this wrapper launches the very same code path (``train.main`` with the
same yaml and overrides) and adds one callback to the built Trainer that hashes every sample of
every train batch. Launch it like ``train.py``::

    composer -n 2 tests/scripts/record_batches.py YAML OUT_DIR [dotted.key=value ...]

Each rank writes ``OUT_DIR/rank{R}.json``::

    {"rank": R, "world_size": W, "exit_code": 0,
     "batches": [[sha1 of sample 0's input_ids, ...], ...]}   # one list per train batch, in order

It is a plain script (not a test module, not a package): pytest never collects it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # train.py is a top-level script, not part of the package

import torch  # noqa: E402
from composer import Callback, State  # noqa: E402
from composer.loggers import Logger  # noqa: E402
from composer.utils import dist  # noqa: E402

import train  # noqa: E402


def sample_hash(tokens: torch.Tensor) -> str:
    """A content hash of one sample's token ids (dtype-normalised, so it is stable across runs)."""
    return hashlib.sha1(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


class RecordBatches(Callback):
    """Hashes each sample of every train batch right after the data loader yields it (before the
    batch is split into micro-batches, so one entry per optimizer step)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def after_dataloader(self, state: State, logger: Logger) -> None:
        input_ids = state.batch["input_ids"]
        self.batches.append([sample_hash(row) for row in input_ids])


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    yaml, out_dir, overrides = argv[0], Path(argv[1]), argv[2:]
    recorder = RecordBatches()
    build_trainer = train.build_trainer  # the name train.main calls; wrap it, change nothing else

    def build_and_record(config, **kwargs):
        trainer = build_trainer(config, **kwargs)
        # Composer's Engine reads state.callbacks at every event, so a callback added after
        # construction runs from the first batch on (it misses only INIT, which it does not use).
        trainer.state.callbacks.append(recorder)
        return trainer

    train.build_trainer = build_and_record
    exit_code = train.main([yaml, *overrides])
    rank = dist.get_global_rank()
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "pid": os.getpid(),
        "exit_code": exit_code,
        "batches": recorder.batches,
    }
    tmp = out_dir / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out_dir / f"rank{rank}.json")
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
