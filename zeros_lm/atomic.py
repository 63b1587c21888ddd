"""Write-then-rename, the one helper every file and directory this package writes goes through.

A file or directory is written under a temporary sibling name (``.<name>.tmp-<host>-<pid>-<token>``),
flushed, and renamed into place, so a reader (or a crash) sees either the old object or the new
one, never half of one. A kill can still leave the temporary sibling behind; ``remove_stale_temporaries``
deletes those whose writing process is gone.

This module uses the standard library only: the exported model's modeling code imports it
(``save_pretrained`` copies it beside ``modeling_zeros.py`` for ``trust_remote_code``).
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable

TMP_MARK = ".tmp-"  # the part of a temporary sibling's name that marks it as one


def temporary_sibling(path, tag: str = "") -> Path:
    """A fresh name beside ``path`` that no other writer (process, host) uses:
    ``.<name>.tmp-<host>-<pid>-<token>`` (``tag`` is inserted before the host)."""
    path = Path(path)
    tag = f"{tag}-" if tag else ""
    return path.with_name(f".{path.name}{TMP_MARK}{tag}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


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
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


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


def atomic_write_dir(path, write_fn: Callable[[Path], None], *, keep_existing: bool = False) -> None:
    """Call ``write_fn(tmp)`` on a fresh directory beside ``path``, then put it in place.

    An existing ``path`` is swapped out (renamed aside, the new one renamed in, the old one deleted),
    or, with ``keep_existing``, kept: the new directory is dropped (another writer got there first,
    e.g. a rank on another node filling a shared cache). A failure while writing leaves ``path`` as
    it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        write_fn(tmp)
        if not (path.exists() or path.is_symlink()):
            try:
                os.rename(tmp, path)
                return
            except OSError:
                if not path.exists():
                    raise
        if keep_existing:
            return
        old = temporary_sibling(path, tag="old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        _remove(old)
    finally:
        if tmp.exists():
            _remove(tmp)


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


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporary siblings in ``folder`` left by writers on this host that are gone (a
    killed save); returns what was removed. Those of live writers and other hosts are kept."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if TMP_MARK in entry.name and entry.name.startswith(".") and not _writer_alive(entry.name):
            _remove(entry)
            removed.append(entry)
    return removed


__all__ = ["TMP_MARK", "atomic_symlink", "atomic_write_dir", "atomic_write_file", "remove_stale_temporaries",
           "temporary_sibling"]
