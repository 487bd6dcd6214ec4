"""Outputs that appear whole or not at all, never over an input or over what another command wrote.

Every offline writer (prepare, demo data, both converters, post-pruning, report, HiFT's offload
folder) goes through this module, so one set of rules holds for all of them:

- an output that is, contains or lies inside one of the command's inputs is refused (symlinks
  resolved), before anything is written;
- an existing output is replaced only when the same command wrote it: a folder carries a hidden
  :data:`MARKER_NAME` file naming its command, a single file is recognised by its writer (``own``);
- everything is built beside the destination under a hidden temp name, fsynced and renamed into place;
  a full disk (``ENOSPC``/``EDQUOT``) removes the temp output and raises :class:`NoSpaceError`,
  whose message is the one line the CLIs print;
- files get the user's umask (safetensors writes 0600, which would lock a shared cluster out);
- a temp output that a killed run left is removed by the next writer of the same output when its
  process is gone from this host, and reported in one log line otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from llmhift.errors import UserError

__all__ = [
    "MARKER_NAME",
    "NoSpaceError",
    "OutputError",
    "atomic_directory",
    "atomic_file",
    "atomic_replace",
    "check_destination",
    "check_inputs",
    "claim_directory",
    "fsync_folder",
    "is_no_space",
    "written_by",
]

MARKER_NAME = ".llmhift-output"  # JSON {"command": ...} inside every output folder
_TEMP_KINDS = ("tmp", "old")  # a block's output being built; a replaced output until it is deleted
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Writers in C++/Rust (safetensors) report a full disk as text, without an errno attribute.
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")

log = logging.getLogger(__name__)

PathLike = Path | str


class OutputError(UserError, ValueError):
    """An output that would destroy an input or what another command wrote; one line naming both paths."""


class NoSpaceError(UserError, OSError):
    """The disk filled while writing ``out``; the temp output is gone and the old output is untouched.

    Every llmhift writer raises this one class (a checkpoint too: ``checkpoint.run_folder.DiskFullError``
    is this class), so a CLI catches one type. Its ``str()`` is the one line the user sees: the generic
    one, or ``message`` where the writer knows more (a checkpoint names its size and how to resume)."""

    def __init__(self, out: Path, needs: Optional[int] = None, message: Optional[str] = None) -> None:
        parent = next(p for p in (out.parent, *out.parents) if p.exists())
        self.out, self.needs, self.free = out, needs, shutil.disk_usage(parent).free
        self.message = message
        super().__init__(errno.ENOSPC, str(self))

    def __str__(self) -> str:
        if self.message is not None:
            return self.message
        needs = f"needs about {self.needs:,} bytes, " if self.needs is not None else ""
        return f"no space left on device writing {self.out} ({needs}{self.free:,} bytes free)"


def _relation(out: Path, item: Path) -> Optional[str]:
    if out == item:
        return "is"
    if out in item.parents:
        return "contains"
    if item in out.parents:
        return "lies inside"
    return None


def check_inputs(out: PathLike, inputs: Iterable[PathLike]) -> None:
    """Refuses an ``out`` that is, contains or lies inside any input (compared as given and with
    symlinks resolved, so a symlink and its target both count)."""
    out = Path(out)
    outs = {out.absolute(), out.resolve()}
    for given in inputs:
        given = Path(given)
        for item in {given.absolute(), given.resolve()}:
            for o in outs:
                if relation := _relation(o, item):
                    raise OutputError(
                        f"output {out} {relation} input {given}"
                        f"{'' if item == given.absolute() else f' (-> {item})'}: writing it could destroy the input; "
                        "choose an output outside every input"
                    )


def written_by(folder: PathLike) -> Optional[str]:
    """The command named by an output folder's marker, or None (no marker: a foreign folder)."""
    marker = Path(folder) / MARKER_NAME
    try:
        return json.loads(marker.read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def _taken(out: Path) -> bool:
    if out.is_dir():
        return any(out.iterdir())
    return out.exists() or out.is_symlink()


def check_destination(
    out: PathLike, overwrite: bool, command: Optional[str] = None, own: Optional[Callable[[Path], bool]] = None
) -> None:
    """Refuses an ``out`` that already holds something unless ``overwrite``; with ``command``, even
    ``overwrite`` may replace only what that command wrote: a folder whose marker names it, or what
    ``own`` recognises (a file's format, or an output that predates markers).

    Without ``command`` (a cache that only ever holds its own writes) ``overwrite`` replaces anything.
    """
    out = Path(out)
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"cannot write {out}: {parent} is not a directory")
    if not _taken(out):
        return
    if command is not None:
        mine = (out.is_dir() and written_by(out) == command) or (own is not None and own(out))
        sign = f"no {MARKER_NAME} file naming it" if out.is_dir() else "not a file it wrote"
        if not mine:
            raise OutputError(
                f"{out} already exists and was not written by {command} ({sign}); "
                "choose a new output path, or move it away yourself if it may go"
            )
    if not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=true (--overwrite) to replace it")


def _alive(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True  # cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _clean_stale(out: Path) -> None:
    """Removes ``.<name>.tmp-*`` / ``.<name>.old-*`` beside ``out`` whose writer died on this host.

    An ``old`` entry whose ``out`` is missing is the previous output of a run killed between its two
    renames: it is put back rather than deleted.
    """
    if not out.parent.is_dir():
        return
    for kind in _TEMP_KINDS:
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            host, _, rest = path.name[len(f".{out.name}.{kind}-"):].rpartition("-")  # host-pid-hex
            host, _, pid = host.rpartition("-")
            if not host or not pid.isdigit() or _alive(host, int(pid)):
                log.warning(f"warning: {path} is a temp output of another run (pid {pid or '?'} on host "
                            f"{host or '?'}); remove it once that run has ended")
                continue
            if kind == "old" and not out.exists() and not out.is_symlink():
                os.replace(path, out)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _new_sibling(out: Path, kind: str, folder: bool = True) -> Path:
    """A hidden, unique path beside ``out`` (same filesystem, so the final rename is atomic) that names
    this host and pid, so that the next run can tell whether it was left by a dead process.

    Not ``tempfile.mkdtemp``: its 0700 mode would survive the rename and lock other users out of a
    shared dataset; ``mkdir`` applies the umask like any other folder.
    """
    path = out.parent / f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    if folder:
        path.mkdir()
    return path


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it the only portable way, and put it back at once
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Gives every file under ``root`` the mode that ``open`` would give it (safetensors writes 0600)."""
    mask = _umask()
    paths = [root] if root.is_file() else [root, *root.rglob("*")]
    for path in paths:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def is_no_space(err: BaseException) -> bool:
    """Whether ``err`` or an exception it came from is a full disk (torch wraps it in a RuntimeError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        if any(text in str(err) for text in _NO_SPACE_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _prepare(
    out: PathLike, overwrite: bool, command: Optional[str], inputs: Iterable[PathLike],
    own: Optional[Callable[[Path], bool]],
) -> Path:
    out = Path(out).absolute()
    check_inputs(out, inputs)
    _clean_stale(out)  # first: it may put back the output that a killed run had moved aside
    check_destination(out, overwrite, command, own)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _fsync(root: Path) -> None:
    """Forces ``root`` (a file, or every file of a folder) to disk before its rename publishes it: a
    rename can reach the disk before the data it names, so a power loss could leave a complete-looking
    output of empty files."""
    for path in [root] if root.is_file() else sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def fsync_folder(folder: Path) -> None:
    """Makes a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(
    out: PathLike,
    overwrite: bool = False,
    *,
    command: Optional[str] = None,
    inputs: Iterable[PathLike] = (),
    own: Optional[Callable[[Path], bool]] = None,
    needs: Optional[int] = None,
) -> Iterator[Path]:
    """Yields an empty temp folder beside ``out``; when the block succeeds it becomes ``out``.

    A reader sees no ``out``, the old one, or the complete new one, never a half-written set. On any
    error (or Ctrl-C) the temp folder is removed; a killed process leaves only a hidden
    ``.<name>.tmp-*`` folder that nothing mistakes for output. With ``overwrite`` the old ``out`` is
    moved aside only once the new one is complete. ``out`` being taken is checked before the block
    and again after it, since another process may fill it meanwhile. ``command`` names the writer in
    the folder's marker, ``own`` recognises its outputs that predate markers (see
    :func:`check_destination`); ``needs`` (bytes, if known) goes into the
    :class:`NoSpaceError` message.
    """
    inputs = list(inputs)
    out = _prepare(out, overwrite, command, inputs, own)
    tmp = _new_sibling(out, "tmp")
    try:
        yield tmp
        if command is not None:
            (tmp / MARKER_NAME).write_text(json.dumps({"command": command}) + "\n")
        _apply_umask(tmp)
        _fsync(tmp)
        check_destination(out, overwrite, command, own)
        old = None
        if out.exists():
            old = _new_sibling(out, "old", folder=False)
            os.replace(out, old)
        try:
            os.rename(tmp, out)  # replaces an empty `out`, fails on a non-empty one
        except OSError as err:
            if old is not None:
                os.replace(old, out)
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{out} was filled by another process meanwhile") from err
            raise
        fsync_folder(out.parent)
        if old is not None:
            _remove(old)
    except BaseException as err:
        _remove(tmp)
        if is_no_space(err):
            raise NoSpaceError(out, needs) from None
        raise


@contextlib.contextmanager
def atomic_file(
    out: PathLike,
    overwrite: bool = False,
    *,
    command: Optional[str] = None,
    inputs: Iterable[PathLike] = (),
    own: Optional[Callable[[Path], bool]] = None,
    needs: Optional[int] = None,
) -> Iterator[Path]:
    """Yields a temp path beside ``out`` that replaces ``out`` only if the block completes.

    ``own(path)`` tells whether an existing ``out`` was written by ``command`` (a single file has no
    room for a marker file, so the writer recognises its own format); the rest as :func:`atomic_directory`.
    """
    inputs = list(inputs)
    out = _prepare(out, overwrite, command, inputs, own)
    with atomic_replace(out, needs, check=lambda: check_destination(out, overwrite, command, own)) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_replace(
    out: PathLike, needs: Optional[int] = None, check: Optional[Callable[[], None]] = None
) -> Iterator[Path]:
    """Yields a temp path beside ``out`` that replaces ``out`` (fsynced, renamed) only if the block completes.

    The core of :func:`atomic_file` without its destination rules, for files that several processes
    may write at once with the same content: a shard that data-loader workers and ranks fetch into one
    cache. No stale-temp sweep (a concurrent writer's temp file is live, not stale) and no refusal of
    an existing ``out``: the last complete copy wins. ``check`` runs just before the rename and may
    refuse it; a full disk raises :class:`NoSpaceError`.
    """
    out = Path(out)
    tmp = _new_sibling(out, "tmp", folder=False)
    try:
        yield tmp
        _apply_umask(tmp)
        _fsync(tmp)
        if check is not None:
            check()
        os.replace(tmp, out)
        fsync_folder(out.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_no_space(err):
            raise NoSpaceError(out, needs) from None
        raise


def claim_directory(out: PathLike, command: str, inputs: Iterable[PathLike] = ()) -> Path:
    """Makes ``out`` a scratch folder of ``command`` that it may write into in place: refused when it
    overlaps an input or holds files of anyone else; created (with its marker) when missing."""
    out = Path(out).absolute()
    check_inputs(out, inputs)
    check_destination(out, overwrite=True, command=command)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_NAME).write_text(json.dumps({"command": command}) + "\n")
    return out
