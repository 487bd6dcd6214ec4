"""Outputs that appear whole or not at all: build beside the destination, rename into place."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_directory", "atomic_file", "check_destination"]


def _output_taken(out: Path) -> bool:
    if out.is_file():
        return True
    return out.is_dir() and any(out.iterdir())


def check_destination(out: Path, overwrite: bool) -> None:
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"cannot write {out}: {parent} is not a directory")
    if not overwrite and _output_taken(out):
        raise FileExistsError(f"{out} already exists and is not empty; pass overwrite=true (--overwrite) to replace it")


def _new_sibling(out: Path, tag: str, folder: bool = True) -> Path:
    """A hidden, unique path beside ``out`` (same filesystem, so the final rename is atomic).

    Not ``tempfile.mkdtemp``: its 0700 mode would survive the rename and lock other users out of a
    shared dataset; ``mkdir`` applies the umask like any other folder.
    """
    path = out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
    if folder:
        path.mkdir()
    return path


@contextlib.contextmanager
def atomic_directory(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temp folder beside ``out``; when the block succeeds it becomes ``out``.

    A reader sees no ``out``, the old one, or the complete new one, never a half-written set. On any
    error (or Ctrl-C) the temp folder is removed; a killed process leaves only a hidden
    ``.<name>.tmp-*`` folder that nothing mistakes for output. With ``overwrite`` the old ``out`` is
    moved aside only once the new one is complete. ``out`` being taken is checked before the block
    and again after it, since another process may fill it meanwhile.
    """
    out = Path(out).absolute()
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out, "tmp")
    try:
        yield tmp
        check_destination(out, overwrite)
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
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temp path beside ``out`` that replaces ``out`` only if the block completes."""
    out = Path(out).absolute()
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out, "tmp", folder=False)
    try:
        yield tmp
        check_destination(out, overwrite)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
