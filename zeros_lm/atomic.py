"""Write-then-rename, the one helper every file and directory this package writes goes through.

A file or directory is written under a temporary sibling name (``.<name>.tmp-<host>-<pid>-<token>``),
flushed, and renamed into place, so a reader (or a crash) sees either the old object or the new
one, never half of one. A kill can still leave the temporary sibling behind; ``remove_stale_temporaries``
deletes those whose writing process is gone.

This module uses the standard library only: the exported model's modeling code imports it
(``save_pretrained`` copies it beside ``modeling_zeros.py`` for ``trust_remote_code``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Optional

TMP_MARK = ".tmp-"  # the part of a temporary sibling's name that marks it as one


def temporary_sibling(path, tag: str = "") -> Path:
    """A fresh name beside ``path`` that no other writer (process, host) uses:
    ``.<name>.tmp-<host>-<pid>-<token>`` (``tag`` is inserted before the host)."""
    path = Path(path)
    tag = f"{tag}-" if tag else ""
    return path.with_name(f".{path.name}{TMP_MARK}{tag}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path) -> None:
    """Delete a file, a link (not what it points to) or a directory tree; nothing if it is gone."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def _discard(path: Path) -> None:
    """:func:`remove_path` in cleanups, where a failure must not hide the error being handled."""
    with contextlib.suppress(OSError):
        remove_path(path)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write_file(path, write_fn: Callable[[Path], None], *, fsync: bool = True) -> None:
    """Call ``write_fn(tmp)`` to write a file at a temporary sibling of ``path``, then rename it over
    ``path``. On any failure (an exception, or a kill) ``path`` is left as it was."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write_fn(tmp)
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if _exists(tmp):
            _discard(tmp)


def atomic_symlink(target: str, linkpath) -> None:
    """Point ``linkpath`` at ``target`` (a relative path is relative to the link's folder) by
    renaming a fresh link over it; a real directory at ``linkpath`` is removed first."""
    linkpath = Path(linkpath)
    tmp = temporary_sibling(linkpath, tag="link")
    os.symlink(target, tmp)
    try:
        if linkpath.is_dir() and not linkpath.is_symlink():
            shutil.rmtree(linkpath)
        os.replace(tmp, linkpath)
    finally:
        if tmp.is_symlink():
            tmp.unlink()


def move_into_place(src, path, *, keep_existing: bool = False) -> bool:
    """Rename the finished ``src`` (a file or directory beside ``path``, normally named by
    :func:`temporary_sibling`) to ``path``; returns whether it was put there.

    A file over a file (or link) is one atomic rename. An existing directory (or anything in the
    way of a directory) is renamed aside, ``src`` renamed in and the old one deleted: a reader
    sees the old or the new one, never a mix. With ``keep_existing`` an existing ``path`` is kept
    and ``src`` deleted (another writer got there first, e.g. a rank on another node filling a
    shared cache)."""
    src, path = Path(src), Path(path)
    if not _exists(path):
        try:
            os.rename(src, path)
            return True
        except OSError:
            if not _exists(path):
                raise
    if keep_existing:
        _discard(src)
        return False
    if not src.is_dir() and not (path.is_dir() and not path.is_symlink()):
        os.replace(src, path)
        return True
    old = temporary_sibling(path, tag="old")
    os.rename(path, old)
    try:
        os.rename(src, path)
    except BaseException:
        os.rename(old, path)
        raise
    _discard(old)
    return True


def atomic_write_dir(path, write_fn: Callable[[Path], None], *, keep_existing: bool = False) -> None:
    """Call ``write_fn(tmp)`` on a fresh directory beside ``path``, then put it in place with
    :func:`move_into_place` (an existing ``path`` is swapped out as a whole, or, with
    ``keep_existing``, kept). A failure while writing leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        write_fn(tmp)
        move_into_place(tmp, path, keep_existing=keep_existing)
    finally:
        if _exists(tmp):
            _discard(tmp)


def _writer_alive(name: str) -> bool:
    """Whether the process that named a temporary sibling ``name`` may still be writing it: true when
    the name is not ours to read, it was made on another host, or its process is alive."""
    try:
        rest = name.split(TMP_MARK, 1)[1]
        host_pid = rest.rsplit("-", 1)[0]  # drop the token
        host, pid = host_pid.rsplit("-", 1)
        pid = int(pid)
    except (IndexError, ValueError):
        return True
    if not host.endswith(socket.gethostname()):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder, of: Optional[str] = None) -> list[Path]:
    """Delete the temporary siblings in ``folder`` (only those of the entry named ``of``, if given)
    left by writers on this host that are gone (a killed save); returns what was removed. Those of
    live writers and other hosts are kept."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    prefix = f".{of}{TMP_MARK}" if of is not None else "."
    for entry in folder.iterdir():
        if TMP_MARK in entry.name and entry.name.startswith(prefix) and not _writer_alive(entry.name):
            _discard(entry)
            removed.append(entry)
    return removed


__all__ = [
    "TMP_MARK",
    "atomic_symlink",
    "atomic_write_dir",
    "atomic_write_file",
    "move_into_place",
    "remove_path",
    "remove_stale_temporaries",
    "temporary_sibling",
]
