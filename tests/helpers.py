"""Test helpers shared across test files: a simulated crash for the resume tests, and a launcher for
the 2-rank CPU runs (DDP or FSDP2 over gloo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from composer import Callback

REPO_ROOT = Path(__file__).resolve().parents[1]
# Launch variables a parent run (say, pytest started under composer or torchrun) could leak into ours.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


class CrashAt(Callback):
    """Simulates a killed job: raises once ``completed`` batches have run (and been checkpointed)."""

    def __init__(self, completed: int) -> None:
        self.completed = completed

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.completed:
            raise KeyboardInterrupt("simulated crash")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_logs(logs: Path) -> str:
    """The tails of every rank's stdout/stderr, for assertion messages."""
    parts = []
    for path in sorted(logs.glob("rank*.std*")):
        parts.append(f"\n--- {path.name} (tail) ---\n{path.read_text(errors='replace')[-3000:]}")
    return "".join(parts)


def launch_ranks(
    script: str, args: list[str], logs: Path, timeout: float, world_size: int = 2,
    env: Optional[dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """``composer -n world_size script args...`` from the repo root, in its own process group so that a
    hang is killed whole (launcher and ranks) and nothing else is touched. ``env`` adds variables
    (``{"FSDP_VERSION": "2"}`` for FSDP2). Each rank's output goes to ``logs/rank{N}.std{out,err}``."""
    logs.mkdir(parents=True, exist_ok=True)
    composer = Path(sys.executable).parent / "composer"  # the launcher of this interpreter's Composer
    launcher = [str(composer)] if composer.exists() else [sys.executable, "-m", "composer.cli"]
    command = [
        *launcher, "-n", str(world_size),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        # the launcher discards ranks > 0 output unless told where to put it
        "--stdout", str(logs / "rank{rank}.stdout"), "--stderr", str(logs / "rank{rank}.stderr"),
        script, *args,
    ]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks on 2 cores: one thread each, no oversubscription
    full_env.update(env or {})
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # our own session: the launcher and its ranks only
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s:\n{output[-4000:]}{rank_logs(logs)}")
    return subprocess.CompletedProcess(command, process.returncode, output, None)
