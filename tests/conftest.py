"""Session-wide fixtures: what several test files read is built once per ``make test``: the embedded
demo corpus and tokenizer, and the 2-rank demo run (a launch costs 15-30 s of start-up alone)."""

import gc
import os
import subprocess
from pathlib import Path

import pytest
from streaming.base.shared.memory import SharedMemory as StreamingSharedMemory
from streaming.base.util import clean_stale_shared_memory

from llmhift.datasets.demo_data import ensure_demo_data
from tests.helpers import RECORD_BATCHES, TWO_RANK_OVERRIDES, launch_ranks


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo data every test trains on; tests read it and never write inside it."""
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="session")
def two_rank_pretrain(demo_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``composer -n 2 tests/scripts/record_batches.py yamls/demo/pretrain.yaml`` (DDP over gloo) with
    ``TWO_RANK_OVERRIDES``: (its folder, the launch). The folder holds ``batches/rank{R}.json`` (the
    samples each rank trained on), ``ckpt/`` (save_folder) and ``logs/`` (each rank's output). The
    launch may have failed: each test asserts on it, with the logs."""
    tmp = tmp_path_factory.mktemp("two_rank_pretrain")
    args = ["yamls/demo/pretrain.yaml", str(tmp / "batches"), f"variables.data_root={demo_root}",
            f"save_folder={tmp / 'ckpt'}", *TWO_RANK_OVERRIDES]  # fmt: skip
    return tmp, launch_ranks(str(RECORD_BATCHES), args, tmp / "logs", timeout=300)




@pytest.fixture(autouse=True)
def _unlink_stale_shared_memory():
    """mosaicml-streaming opens, and keeps open, every /dev/shm segment its prefix scan finds. Segments
    of finished or SIGKILLed runs (the fault tests make such runs) would cost each later in-process
    dataset one descriptor apiece, until the suite hits EMFILE; no dataset outlives its test, so each
    test ends by unlinking them (mappings still open stay valid)."""
    yield
    clean_stale_shared_memory()
    if len(os.listdir("/proc/self/fd")) > 2000:  # streaming's atexit hooks keep every segment's descriptor
        for obj in gc.get_objects():
            if isinstance(obj, StreamingSharedMemory):
                try:
                    obj.shm.close()
                except (BufferError, OSError):
                    continue
