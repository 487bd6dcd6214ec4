"""Test helpers shared across test files: a simulated crash for the resume tests, and a launcher for
the 2-rank CPU runs (DDP or FSDP2 over gloo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from composer import Callback

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD_BATCHES = REPO_ROOT / "tests" / "scripts" / "record_batches.py"
# conftest's two_rank_pretrain: the demo pretrain yaml (the model shrunk) on 2 DDP ranks, 6 batches of 4
# samples per rank, 2 loader workers, evaluated at batches 3 and 6. A proportion change waits 5 batches,
# so none applies before the end: each rank reads its planned stream at the yaml's initial mix.
TWO_RANK_BATCHES, TWO_RANK_PER_RANK_BATCH = 6, 4
TWO_RANK_OVERRIDES = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.intermediate_size=64",
    f"max_duration={TWO_RANK_BATCHES}ba", "eval_interval=3ba", f"save_interval={TWO_RANK_BATCHES}ba",
    f"global_train_batch_size={2 * TWO_RANK_PER_RANK_BATCH}", f"device_train_microbatch_size={TWO_RANK_PER_RANK_BATCH}",
    "device_eval_batch_size=128", "train_loader.num_workers=2", "train_loader.dataset.lookahead_batches=5",
    "progress_bar=false", "log_to_console=false",
]  # fmt: skip
# Launch variables a parent run (say, pytest started under composer or torchrun) could leak into ours,
# and the FSDP version a developer's shell may set.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
             "FSDP_VERSION")


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
    (``{"FSDP_VERSION": "2"}`` for FSDP2 in a Trainer of the script's own; train.py uses it by default). Each rank's output goes to ``logs/rank{N}.std{out,err}``."""
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


def sharded_crash_resume_and_single(
    script: str, yaml: str, overrides: Callable[[str], list[str]], tmp: Path, crash_at: int, timeout: float,
    read: Callable[[Path], Any], record: str = "rank{rank}.json",
) -> dict[str, list[Any]]:
    """The three runs the FSDP2 tests compare, of a rank script taking ``OUT [--crash-at N] YAML
    overrides...`` and writing ``OUT/<record>`` per rank: ``first`` (2 ranks, sharded checkpoints,
    crashing at batch ``crash_at``), ``resumed`` (the same 2 ranks, autoresuming from the sharded
    checkpoint) and ``single`` (one process, no FSDP). ``overrides(name)`` gives a run's yaml overrides
    (``fsdp`` for the two launches, which share a save folder); ``read`` loads one record."""
    sharded = ["fsdp_config={sharding_strategy: FULL_SHARD, state_dict_type: sharded}"]
    launches = {"first": ["--crash-at", str(crash_at), yaml], "resumed": [yaml, "autoresume=true"]}
    records = {}
    for name, args in launches.items():
        out, logs = tmp / "out" / name, tmp / "logs" / name
        process = launch_ranks(script, [str(out), *args, *overrides("fsdp"), *sharded], logs, timeout)
        assert process.returncode == 0, process.stdout[-4000:] + rank_logs(logs)
        records[name] = [read(out / record.format(rank=r)) for r in range(2)]
    out = tmp / "out" / "single"
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"  # one thread, like each rank of the launches above
    process = subprocess.run([sys.executable, script, str(out), yaml, *overrides("single")], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=timeout)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    records["single"] = [read(out / record.format(rank=0))]
    return records


def run_train_main(argv: list[str], setup: Callable[[Any], None] = lambda trainer: None) -> tuple[dict[str, Any], int]:
    """A rank script's body: ``train.main(argv)`` in this process, with ``setup(trainer)`` called on the
    Trainer train.py builds (after any autoresume load, before fit). A leading ``--crash-at N`` adds
    :class:`CrashAt`; the simulated crash is caught. Returns ``({"error", "start_batch", "end_batch"},
    exit code)``; the repository root must be importable (``train``)."""
    import train

    crash_at = None
    if argv and argv[0] == "--crash-at":
        crash_at, argv = int(argv[1]), argv[2:]
    record: dict[str, Any] = {"error": None}
    built: list[Any] = []
    build_trainer = train.build_trainer

    def build(config, **kwargs):
        trainer = build_trainer(config, **kwargs)
        record["start_batch"] = int(trainer.state.timestamp.batch)
        setup(trainer)
        if crash_at is not None:
            trainer.state.callbacks.append(CrashAt(crash_at))
        built.append(trainer)
        return trainer

    train.build_trainer = build
    try:
        exit_code = train.main(argv)
    except KeyboardInterrupt as err:
        record["error"], exit_code = str(err), 0
    finally:
        train.build_trainer = build_trainer
    if built:
        record["end_batch"] = int(built[0].state.timestamp.batch)
    return record, exit_code


# The config.json of the 7B sources the recipe yamls name (Hugging Face's meta-llama/Llama-2-7b-hf and
# Meta-Llama-3-8B, the fields llmhift reads). Those yamls take the architecture from model.pretrained,
# and a dry run needs only this file of it: tests dry-run them with a folder holding it alone.
LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
LLAMA3_8B_CONFIG = {
    **LLAMA2_7B_CONFIG, "vocab_size": 128256, "intermediate_size": 14336, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001,
}  # fmt: skip


def config_only_model(folder: Path, config: dict[str, Any] = LLAMA2_7B_CONFIG) -> Path:
    """A model folder holding only ``config.json``: what a dry run away from the weights needs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def save_hf_llama(folder: Path, tokenizer: Path, seed: int = 0, **shape: Any) -> Path:
    """A random LLaMA of the demo vocabulary (2048, tied) written by transformers' ``save_pretrained``,
    with the demo tokenizer's files beside it: a teacher or student for distillation tests."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, max_position_embeddings=128, tie_word_embeddings=True, **shape)
    LlamaForCausalLM(config).save_pretrained(folder)
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    return folder
