"""The run folder (``save_folder``): one run at a time, checkpoints that appear only when complete, and
an autoresume that steps over what a kill or a full disk left half-written.

A week-long job restarts unattended after preemption, so a restart must never die on a file its
predecessor left behind, and two jobs pointed at one folder must never overwrite each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist, save_checkpoint

from llmhift.atomic import NoSpaceError, fsync_folder, is_no_space
from llmhift.checkpoint.io import is_sharded_checkpoint, load_checkpoint
from llmhift.errors import ConfigError

__all__ = [
    "CHECKPOINT_NAME",
    "LATEST_NAME",
    "RUN_LOCK",
    "INCOMPLETE",
    "RunFolderError",
    "DiskFullError",
    "AtomicCheckpointSaver",
    "RunFolderClaim",
    "lock_run_folder",
    "unlock_run_folder",
    "check_fresh",
    "checkpoint_problem",
    "recover_checkpoints",
    "prepare_run_folder",
]

CHECKPOINT_NAME = "ep{epoch}-ba{batch}-rank{rank}.pt"  # Composer's default save_filename
LATEST_NAME = "latest-rank{rank}.pt"  # Composer's default save_latest_filename, what autoresume reads
RUN_LOCK = "run.lock"  # holds the running process's pid and host
INCOMPLETE = ".incomplete"  # suffix of a checkpoint that does not load, moved aside by autoresume

# A monolithic file (ep0-ba4-rank0.pt) or a sharded folder (ep0-ba4/, Composer's sharded_ckpt_prefix_dir).
_CHECKPOINT = re.compile(r"^ep(\d+)-ba(\d+)(?:-rank0\.pt)?$")
# The name a checkpoint is written under before its rename, which a killed save leaves behind:
# ".ep0-ba4-rank0.tmp-<pid>.pt". Hidden, so Composer's conflicting-file check never sees it, and ending
# in .pt, since Composer picks the writer from the extension (".pt.<x>" would ask for a compressor <x>).
_TMP = ".tmp-"
_UNFINISHED = re.compile(rf"^\.ep\d+-ba\d+-rank\d+{re.escape(_TMP)}\d+\.pt$")

# Folders whose lock this process holds: realpath -> [file descriptor, holders]. A process may build
# several Trainers on one folder (tests, notebooks): the lock excludes other processes, not itself.
_HELD: dict[Path, list[int]] = {}


class RunFolderError(ConfigError):
    """The save folder cannot take this run; the message names the folder and the fix."""


# No space left while writing a checkpoint: the one class every llmhift writer raises, under the name
# this module has always exported (train.py and users catch it).
DiskFullError = NoSpaceError


class AtomicCheckpointSaver(CheckpointSaver):
    """Composer's CheckpointSaver, except that a checkpoint appears under its name only when complete.

    Composer 0.32.1 writes a monolithic checkpoint straight into its final name
    (``composer.utils.checkpoint._write_checkpoint_file`` opens ``ep0-ba4-rank0.pt`` and streams into it)
    and re-points ``latest-rank0.pt`` by removing and re-creating the link. A kill or a full disk
    mid-write thus leaves a truncated file that autoresume loads, or that ``fit_start``'s
    conflicting-file check refuses forever. This saver writes the file under a hidden temp name beside
    its own, fsyncs it, renames it into place, fsyncs the folder, and swaps the link atomically (a new
    link renamed over the old). (Not :func:`llmhift.atomic.atomic_file`: its temp names end in a
    random tag, and Composer chooses compression from a checkpoint name's extension.)

    Why a subclass and not something else: the Trainer takes a ``CheckpointSaver`` given among its
    callbacks as *the* saver (its folder and latest-link name drive autoresume), which is Composer's
    extension point; the one method that writes is replaced, everything else (intervals, rotation,
    resumable state) is Composer's. Sharded checkpoints go to Composer unchanged: torch's distributed
    checkpoint writer fsyncs every shard and writes ``.metadata`` last (to ``.metadata.tmp``, fsync,
    rename), so a folder without ``.metadata`` is incomplete and :func:`recover_checkpoints` treats it so.
    Remote save folders keep Composer's own saver (an object store shows an upload whole or not at all).
    Unlike Composer's saver, it offers no checkpoint to loggers for upload (WandB ``log_artifacts``).

    Raises :class:`~llmhift.atomic.NoSpaceError` (alias ``DiskFullError``) when the disk fills, naming the folder and, when a previous checkpoint
    shows it, the bytes one checkpoint takes.

    Args:
        folder (str): the local save folder (``{run_name}`` allowed).
        save_interval (str): as Composer's ``save_interval``.
        num_checkpoints_to_keep (int): as Composer's (default -1: all).
        overwrite (bool): as Composer's ``save_overwrite`` (default False).
    """

    def __init__(self, folder: str, save_interval: str, num_checkpoints_to_keep: int = -1,
                 overwrite: bool = False) -> None:
        # The Trainer's autoresume asserts a latest_remote_file_name; a local run's is the local link's
        # path, as the Trainer sets it for its own saver (a logger that uploads files may hold a copy).
        super().__init__(folder=folder, filename=CHECKPOINT_NAME, remote_file_name=None,
                         latest_filename=LATEST_NAME, latest_remote_file_name=str(Path(folder) / LATEST_NAME),
                         save_interval=save_interval, overwrite=overwrite,
                         num_checkpoints_to_keep=num_checkpoints_to_keep)

    def _save_checkpoint(self, state: State, logger: Logger) -> None:
        try:
            if state.fsdp_sharded_state_dict_enabled:
                super()._save_checkpoint(state, logger)
            else:
                self._save_monolithic(state)
        except Exception as err:
            if is_no_space(err):
                folder = Path(format_name_with_dist(self.folder, state.run_name)).absolute()
                raise NoSpaceError(folder, message=self._disk_full_message(folder)) from None
            raise

    def _save_monolithic(self, state: State) -> None:
        self.last_checkpoint_batch = state.timestamp.batch
        final = Path(self.filename.format(state))
        self.all_saved_checkpoints_to_timestamp[str(final)] = state.timestamp  # the checkpoint lists itself
        if dist.get_global_rank() != 0:  # every rank joins: a full state dict under FSDP is a collective
            save_checkpoint(state, str(final), weights_only=self.weights_only, ignore_keys=self.ignore_keys)
            return
        tmp = final.with_name(f".{final.stem}{_TMP}{os.getpid()}{final.suffix}")
        try:
            save_checkpoint(state, str(tmp), weights_only=self.weights_only, ignore_keys=self.ignore_keys)
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_folder(final.parent)
        if self.latest_filename is not None and self.num_checkpoints_to_keep != 0:
            _point_latest(Path(self.latest_filename.format(state)), final)
        self.saved_checkpoints.append(str(final))
        if self.num_checkpoints_to_keep >= 0:
            self._rotate_checkpoints(sharding_enabled=False)

    def _disk_full_message(self, folder: Path) -> str:
        free = shutil.disk_usage(folder).free
        complete = (p for p in reversed(_checkpoints(folder)) if p.is_file() and checkpoint_problem(p) is None)
        previous = next(complete, None)
        size = f"a checkpoint takes {previous.stat().st_size:,} bytes, " if previous else ""
        return (f"save_folder: {folder}: no space left on device writing a checkpoint ({size}{free:,} bytes "
                "free); free space or point save_folder at a larger disk, then rerun with autoresume=true")


def _point_latest(link: Path, target: Path) -> None:
    """Re-points ``link`` at ``target`` atomically: a reader sees the old link or the new one, never none."""
    staged = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    staged.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), staged)
    os.replace(staged, link)


def _holder(fd: int) -> str:
    """Who holds a lock: the pid and host it wrote (a holder writes them right after locking)."""
    for _ in range(20):
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
        if len(text) == 2:
            return f"pid {text[0]} on host {text[1]}"
        time.sleep(0.05)
    return "another process (it has not written its pid yet)"


def _try_lock(path: Path, create: bool) -> Optional[int]:
    """The descriptor holding ``path``'s lock, None when there is no lock file and ``create`` is False."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunFolderError(
            f"save_folder: {path.parent} is in use by {holder} (lock {path}); let that run finish, or choose "
            "another save_folder"
        ) from None
    return fd


def lock_run_folder(folder: Path, fresh: bool = False) -> bool:
    """Takes the exclusive lock of ``folder`` for this process, writing its pid and host into it;
    True when it had to create ``folder``.

    ``fresh``: refuse a folder that already holds anything (:func:`check_fresh`), before writing
    anything. The lock is ``flock`` on ``folder/run.lock``: the kernel drops it when the process ends,
    however it ends, so a killed run never leaves a stale lock (the file stays, with the last holder's
    pid, and means nothing while unlocked). Network filesystems must support ``flock`` (NFSv4 does;
    Lustre needs its ``flock`` mount option).
    """
    folder = folder.absolute()
    key = folder.resolve()
    if key in _HELD:
        if fresh:
            check_fresh(folder)
        _HELD[key][1] += 1
        return False
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"save_folder: {folder} is a file; give a folder")
    created = not folder.exists()
    fd = _try_lock(folder / RUN_LOCK, create=False) if folder.is_dir() else None
    try:
        if fresh:
            check_fresh(folder)
        if fd is None:
            folder.mkdir(parents=True, exist_ok=True)
            fd = _try_lock(folder / RUN_LOCK, create=True)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    assert fd is not None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    os.fsync(fd)
    _HELD[folder.resolve()] = [fd, 1]
    return created


def unlock_run_folder(folder: Path) -> None:
    """Gives up one hold of ``folder``'s lock; the last one unlocks it (the file stays)."""
    key = folder.resolve()
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        fcntl.flock(held[0], fcntl.LOCK_UN)
        os.close(held[0])


def check_fresh(folder: Path) -> None:
    """A run without autoresume starts only in a missing or empty folder: it would otherwise overwrite
    another run's config.yaml, append to its metrics.jsonl and collide with its checkpoints."""
    if not folder.is_dir():
        return
    found = sorted(p.name for p in folder.iterdir() if p.name != RUN_LOCK)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunFolderError(
            f"save_folder: {folder} already holds a run ({shown}); continue it with autoresume=true, or choose "
            "another save_folder (or run_name, where save_folder depends on it)"
        )


def _checkpoints(folder: Path) -> list[Path]:
    """``ep*-ba*`` checkpoints in ``folder``, oldest first."""
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match:
            found.append(((int(match[1]), int(match[2])), path))
    return [path for _, path in sorted(found)]


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be loaded, or None when it can.

    A file is unpickled with its tensors memory-mapped (a truncated file loses the zip directory at
    its end, so any truncation shows, at the cost of reading the small pickle only). A sharded folder
    needs its ``.metadata`` and every shard file as long as the metadata says.
    """
    if path.is_dir():
        return _sharded_problem(path)
    try:
        checkpoint = load_checkpoint(path, memory_map=True)
    except Exception as err:  # torch and the unpickler raise many types for a damaged file
        return str(err).splitlines()[0]
    if "state" not in checkpoint:
        return "not a Composer checkpoint (no 'state')"
    return None


def _sharded_problem(folder: Path) -> Optional[str]:
    from torch.distributed.checkpoint import FileSystemReader

    if not is_sharded_checkpoint(folder):
        return "no .metadata (the save did not finish)"
    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data
    except Exception as err:  # an unreadable pickle
        return f".metadata: {str(err).splitlines()[0]}"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file() or shard.stat().st_size < size:
            have = shard.stat().st_size if shard.is_file() else 0
            return f"{name} holds {have:,} of {size:,} bytes"
    return None


def _aside(path: Path) -> Path:
    target, n = path.with_name(path.name + INCOMPLETE), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.name}{INCOMPLETE}-{n}")
    os.rename(path, target)
    return target


def recover_checkpoints(folder: Path, move_aside: bool = True) -> tuple[Optional[Path], Optional[str]]:
    """The newest checkpoint in ``folder`` that loads, and a one-line note of what was wrong, if anything.

    Checkpoints newer than that one are moved aside to ``<name>.incomplete`` (kept for inspection;
    never deleted), ``latest-rank0.pt`` is pointed at it (or removed when none loads), and temp files of
    saves that were killed mid-write are removed. ``move_aside=False`` changes nothing on disk (an
    evaluation reading a folder it does not own).
    """
    latest = folder / LATEST_NAME.format(rank=0)
    unfinished = [p for p in folder.iterdir() if _UNFINISHED.match(p.name)]
    good, bad = None, []
    for path in reversed(_checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            good = path
            break
        bad.append((path, problem))
    notes = [f"{p.name} does not load ({problem})" for p, problem in bad]
    if move_aside:
        for path in unfinished:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        notes = [f"{p.name} does not load ({problem}), moved to {_aside(p).name}" for p, problem in bad]
        if good is None:
            latest.unlink(missing_ok=True)
        elif not latest.exists() or latest.resolve() != good.resolve():
            _point_latest(latest, good)
        if unfinished:
            notes.append(f"removed {len(unfinished)} unfinished save(s) of a killed run")
    if not notes:
        return good, None
    resume = f"resuming from {good.name}" if good else "no checkpoint loads: starting from the beginning"
    return good, f"save_folder {folder}: {'; '.join(notes)}; {resume}"


class RunFolderClaim(Callback):
    """The outcome of :func:`prepare_run_folder`, given to the Trainer among its callbacks so that the
    save folder stays locked as long as the Trainer lives: released when the Trainer is closed (train.py
    closes it when done; the process's end releases it in any case).

    Attributes:
        checkpoint: the checkpoint an evaluation-only run loads (the newest good one, with autoresume).
    """

    def __init__(self, folder: Optional[Path], checkpoint: Optional[str], created: bool = False) -> None:
        self.folder, self.checkpoint, self.created = folder, checkpoint, created

    def post_close(self) -> None:
        if self.folder is not None:
            unlock_run_folder(self.folder)
            self.folder = None

    def abandon(self) -> None:
        """Unlocks after a build that failed before the Trainer existed, and removes the folder when
        this run created it and wrote nothing but its lock: a refused run leaves no trace."""
        folder, created = self.folder, self.created
        self.post_close()
        if folder is not None and created and folder.resolve() not in _HELD:
            if [p.name for p in folder.iterdir()] == [RUN_LOCK]:
                (folder / RUN_LOCK).unlink()
                with contextlib.suppress(OSError):  # another process wrote into it meanwhile: keep it
                    folder.rmdir()


def prepare_run_folder(save_folder: Optional[str], run_name: Optional[str], autoresume: bool,
                       eval_only: bool = False) -> RunFolderClaim:
    """Readies the save folder before the Trainer is built: locks it, refuses a folder that is not this
    run's to write, and with autoresume moves checkpoints that do not load aside.

    Global rank 0 decides and the outcome is broadcast, so every rank stops together on a refusal.
    Only global rank 0 locks: it alone writes monolithic checkpoints, config.yaml and metrics.jsonl,
    and a sharded run is resumable only from one folder all ranks share (a node-local rank 0 per node
    would lock that shared folder against its own job). A training run refuses a non-empty folder
    without autoresume. An evaluation (``eval_only``) writes no checkpoint, so a finished run's folder
    is fine: it still locks it (its loggers may append to the run's metrics.jsonl, which a live run must
    not share) but moves nothing; with autoresume it evaluates the newest checkpoint that loads.
    """
    outcome: list[Any] = [("ok", None)]
    folder, created = None, False
    if dist.get_global_rank() == 0 and save_folder and "://" not in save_folder:
        folder = Path(format_name_with_dist(save_folder, run_name)).absolute()
        try:
            created = lock_run_folder(folder, fresh=not (autoresume or eval_only))
        except RunFolderError as err:
            outcome[0], folder = ("error", str(err)), None
        if folder is not None and autoresume:
            good, note = recover_checkpoints(folder, move_aside=not eval_only)
            if note:
                print(f"warning: {note}", file=sys.stderr)
            outcome[0] = ("ok", str(good) if good else None)
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise RunFolderError(value)
    return RunFolderClaim(folder, value, created)
