"""Faults against the run folder, each named after what it injects, on real runs of the demo model:
a truncated newest checkpoint, a kill and a full disk during a save, two runs into one folder, and a
run started into a finished run's folder."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from llmhift.checkpoint.run_folder import INCOMPLETE, RUN_LOCK
from tests.helpers import REPO_ROOT

DEMO_YAML = "yamls/demo/pretrain.yaml"
FAULT_SCRIPT = str(REPO_ROOT / "tests" / "scripts" / "fault_at_save.py")


def overrides(demo_root, folder, *extra):
    """A tiny demo run: a checkpoint every 2 batches, all kept, no evaluation (faults strike at saves), and
    batches of 4 samples (what is tested is the saving, not the training)."""
    return [f"variables.data_root={demo_root}", f"save_folder={folder}", "progress_bar=false",
            "log_to_console=false", "save_interval=2ba", "save_num_checkpoints_to_keep=-1", "eval_loader=null",
            "global_train_batch_size=4", "device_train_microbatch_size=4", "max_duration=6ba", *extra]  # fmt: skip


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]["model"]


def contents(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` with its bytes (a link by its target)."""
    return {p.name: os.readlink(p).encode() if p.is_symlink() else p.read_bytes() for p in sorted(folder.iterdir())}


def run_command(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_moved_aside_and_the_run_resumes_exactly(demo_root, tmp_path, capsys):
    folder = tmp_path / "run"
    args = [DEMO_YAML, *overrides(demo_root, folder, "autoresume=true", "run_name=truncated")]
    assert train.main(args) == 0
    newest = folder / "ep0-ba6-rank0.pt"
    uninterrupted = model_weights(newest)
    half = newest.stat().st_size // 2
    with open(newest, "r+b") as file:  # what a kill or a full disk left under Composer's own saver
        file.truncate(half)
    capsys.readouterr()

    assert train.main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ep0-ba6-rank0.pt does not load" in warnings[0], warnings
    assert "resuming from ep0-ba4-rank0.pt" in warnings[0], warnings
    assert (folder / f"ep0-ba6-rank0.pt{INCOMPLETE}").stat().st_size == half  # kept, not deleted
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba6-rank0.pt"
    resumed = model_weights(newest)  # batches 5 and 6 trained again from the batch-4 checkpoint
    assert sorted(resumed) == sorted(uninterrupted)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_a_folder_the_restart_finishes(demo_root, tmp_path, capsys):
    folder = tmp_path / "run"
    args = [DEMO_YAML, *overrides(demo_root, folder, "autoresume=true", "run_name=killed")]
    code, _, err = finish(run_command(FAULT_SCRIPT, "kill", "4", str(1 << 20), *args))
    assert code == -9, err[-3000:]  # killed after 1 MiB of the batch-4 checkpoint
    names = sorted(p.name for p in folder.iterdir())
    assert "ep0-ba4-rank0.pt" not in names, names  # a partial file never carries a checkpoint's name
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba2-rank0.pt"
    assert [n for n in names if n.startswith(".ep0-ba4")], names  # the unfinished write, hidden

    assert train.main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "removed 1 unfinished save" in warnings[0], warnings
    assert not [p for p in folder.iterdir() if p.name.startswith(".ep")]
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba6-rank0.pt"  # trained to the end


@pytest.mark.slow
def test_enospc_at_save_is_one_line_and_leaves_no_partial_checkpoint(demo_root, tmp_path):
    folder = tmp_path / "run"
    args = [DEMO_YAML, *overrides(demo_root, folder, "max_duration=2ba")]
    code, out, err = finish(run_command(FAULT_SCRIPT, "enospc", "2", str(1 << 20), *args))
    assert code == 2, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert len(errors(err)) == 1, err[-3000:]
    line = errors(err)[0]
    assert f"save_folder: {folder}: no space left on device" in line and "autoresume=true" in line, line
    assert not [p for p in folder.iterdir() if "ep0-ba2" in p.name]  # neither the checkpoint nor its temp


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 MiB tmpfs: room for one demo checkpoint (12 MB) and not two. Needs root."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_full_tmpfs_at_save_names_the_folder_and_the_bytes(demo_root, small_tmpfs, capsys):
    folder = small_tmpfs / "run"
    assert train.main([DEMO_YAML, *overrides(demo_root, folder, "max_duration=4ba")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(errors(err)) == 1, err
    size = (folder / "ep0-ba2-rank0.pt").stat().st_size
    assert f"no space left on device writing a checkpoint (a checkpoint takes {size:,} bytes" in errors(err)[0]
    assert sorted(p.name for p in folder.iterdir() if "ep0" in p.name) == ["ep0-ba2-rank0.pt"]
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba2-rank0.pt"


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(demo_root, tmp_path):
    folder = tmp_path / "run"
    args = [DEMO_YAML, *overrides(demo_root, folder, "max_duration=10ba")]
    first, second = run_command("train.py", *args), run_command("train.py", *args)
    results = {first.pid: finish(first), second.pid: finish(second)}
    refused = [pid for pid, (code, _, _) in results.items() if code == 2]
    assert len(refused) == 1, {pid: (code, err[-2000:]) for pid, (code, _, err) in results.items()}
    (winner,) = set(results) - set(refused)
    code, _, err = results[refused[0]]
    assert "Traceback" not in err and len(errors(err)) == 1, err[-3000:]
    assert f"is in use by pid {winner} on host {socket.gethostname()}" in errors(err)[0], err[-3000:]
    assert results[winner][0] == 0, results[winner][2][-3000:]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = [r["batch"] for r in records if "loss/train/total" in r]
    assert trained == list(range(10)), trained  # one run's lines (Composer logs batch i at step i-1), not two
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba10-rank0.pt"


@pytest.mark.slow
def test_a_run_into_a_finished_runs_folder_is_refused_and_changes_nothing(demo_root, tmp_path):
    folder = tmp_path / "run"
    args = [DEMO_YAML, *overrides(demo_root, folder, "max_duration=2ba")]
    assert train.main(args) == 0
    (folder / ".hidden-note").write_text("a user's file counts too")
    before, stamps = contents(folder), {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    time.sleep(0.01)
    code, _, err = finish(run_command("train.py", *args[:-1], "max_duration=4ba", "optimizer.lr=1.0e-2"))
    assert code == 2 and "Traceback" not in err and len(errors(err)) == 1, err[-3000:]
    assert f"save_folder: {folder} already holds a run" in errors(err)[0] and "autoresume=true" in errors(err)[0]
    assert contents(folder) == before  # config.yaml included
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert (folder / RUN_LOCK).is_file()


@pytest.mark.slow
def test_a_restart_of_a_finished_run_exits_0_without_training(demo_root, tmp_path, capsys):
    """A preemption-restart loop relaunches a run that has just finished; Composer's fit would refuse
    ("No training would occur") and the loop would fail forever."""
    folder = tmp_path / "run"
    args = [DEMO_YAML, *overrides(demo_root, folder, "autoresume=true", "run_name=finished", "max_duration=2ba")]
    assert train.main(args) == 0
    before = contents(folder)
    capsys.readouterr()
    assert train.main(args) == 0
    assert "run already finished: 2ba of max_duration 2ba" in capsys.readouterr().out
    assert contents(folder) == before


@pytest.mark.slow
def test_a_callback_refusing_its_folder_is_one_line_and_leaves_no_save_folder(demo_root, tmp_path, capsys):
    """HiFT's offload_dir inside the save folder is refused when the Trainer initialises its callbacks,
    after the save folder was claimed: train.py prints one line, and the folder it created is gone."""
    folder = tmp_path / "run"
    args = [DEMO_YAML, *overrides(demo_root, folder, f"callbacks.hift.offload_dir={folder / 'parked'}")]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert errors(err) == [line for line in err.splitlines() if line.strip()] and len(errors(err)) == 1, err
    assert "lies inside input" in err and "Traceback" not in err
    assert not folder.exists()


@pytest.mark.slow
def test_eval_only_with_autoresume_and_no_checkpoint_is_refused(demo_root, tmp_path, capsys):
    """Evaluating an empty run folder would measure random weights and report them as the run's."""
    folder = tmp_path / "run"
    args = [DEMO_YAML, "--eval-only", *overrides(demo_root, folder, "autoresume=true", "run_name=empty")]
    args.remove("eval_loader=null")
    assert train.main(args) == 2
    (line,) = errors(capsys.readouterr().err)
    assert "found no checkpoint that loads" in line
    assert not folder.exists()
