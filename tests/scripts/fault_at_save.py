"""Runs ``train.py``'s ``main`` unchanged, with a fault injected while one checkpoint is being written.

Why it exists: ``tests/test_faults_run.py`` must show what a kill or a full disk in the middle of a
save leaves behind, through the real command. Launch it like ``train.py``::

    python tests/scripts/fault_at_save.py {kill,enospc} BATCH BYTES YAML [dotted.key=value ...]

The fault strikes in the file object's ``write``, the lowest write call Python makes while torch
serialises a checkpoint (Composer opens the file with ``open(name, "wb")`` and torch's zip writer calls
its ``write``), once BYTES bytes of the checkpoint of batch BATCH have gone through: ``kill`` flushes
what was written and sends SIGKILL to this process (a preempted node), ``enospc`` raises
``OSError(ENOSPC)`` (a full disk). The checkpoint is recognised by ``ep<E>-ba<BATCH>-rank0`` in its
file name, whatever temp name a saver writes it under.

It is a plain script (not a test module, not a package): pytest never collects it.
"""

from __future__ import annotations

import builtins
import errno
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # train.py is a top-level script, not part of the package

import train  # noqa: E402


class FaultyFile:
    """A binary file whose writes fail once ``limit`` bytes have been written."""

    def __init__(self, file: Any, mode: str, limit: int) -> None:
        self.file, self.mode, self.limit, self.written = file, mode, limit, 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self.written + size > self.limit:
            if self.mode == "kill":
                self.file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += size
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> "FaultyFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


def main() -> int:
    mode, batch, limit, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    target = re.compile(rf"ep\d+-ba{batch}-rank0")
    real_open = builtins.open

    def open_with_fault(file: Any, mode_: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = real_open(file, mode_, *args, **kwargs)
        if "w" in mode_ and isinstance(file, (str, os.PathLike)) and target.search(os.path.basename(file)):
            return FaultyFile(opened, mode, limit)
        return opened

    builtins.open = open_with_fault
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
