"""Inter-process locks that die with their owner.

POSIX record locks (``fcntl.lockf``) belong to the process that took them: the kernel releases them
when that process exits, however it exits (``kill -9`` included), and processes forked from it
(``datasets`` workers, DataLoader workers) do not hold them, even though they inherit the file
descriptor. (An ``flock`` lock, by contrast, belongs to the open file and lives on in every forked
child: a killed data preparation whose workers outlived it kept the data cache locked forever.)

Two properties of POSIX locks are handled here: a process never conflicts with itself, and closing
*any* descriptor of the file releases the process's lock; so each process opens a lock file once
and counts nested acquisitions.

The holder writes ``<pid> <host>`` into the lock file, so that a waiting process can say who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

__all__ = ["LockBusy", "acquire", "release", "held", "lock_holder", "processes_holding"]

POLL_SECONDS = 0.2

# path -> [file descriptor, nesting depth], for the locks this process holds
_HELD: dict[str, list[int]] = {}


class LockBusy(RuntimeError):
    """The lock is held by another live process (``holder``: its ``"<pid> <host>"``, if known)."""

    def __init__(self, path: Path, holder: Optional[str]):
        super().__init__(f"{path} is locked by {describe_holder(holder)}")
        self.path, self.holder = path, holder


def processes_holding(path: Path) -> Optional[list[int]]:
    """The processes of this machine, other than this one, that have ``path`` open (read from
    ``/proc``; processes of other users may be missed); None where ``/proc`` cannot tell."""
    target = os.path.realpath(path)
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    holders = []
    for pid_dir in proc.glob("[0-9]*"):
        pid = int(pid_dir.name)
        if pid == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (pid_dir / "fd").iterdir()):
                holders.append(pid)
        except OSError:  # gone meanwhile, or another user's
            continue
    return holders


def lock_holder(path: Path) -> Optional[str]:
    """``"<pid> <host>"`` as written by the process that holds (or last held) the lock."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return text or None


def describe_holder(holder: Optional[str]) -> str:
    if not holder:
        return "another process"
    pid, _, host = holder.partition(" ")
    here = socket.gethostname()
    return f"process {pid}" + (f" on {host}" if host and host != here else "")


def acquire(
    path: Path,
    timeout: Optional[float] = None,
    on_wait: Optional[Callable[[Optional[str]], None]] = None,
) -> None:
    """Take the exclusive lock ``path`` (created if needed). ``timeout``: seconds to wait for another
    process to release it (0: do not wait; None: wait as long as it takes); :class:`LockBusy` when
    it runs out. ``on_wait(holder)`` is called once if the lock is busy at first."""
    path = Path(path)
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    deadline = None if timeout is None else time.monotonic() + timeout
    waited = False
    try:
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise LockBusy(path, lock_holder(path))
            if not waited and on_wait is not None:
                on_wait(lock_holder(path))
            waited = True
            time.sleep(POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = [fd, 1]


def release(path: Path) -> None:
    """Undo one :func:`acquire` of ``path`` by this process (the lock goes at the outermost)."""
    key = os.path.realpath(path)
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _HELD[key]
        os.close(entry[0])  # releases the record lock


@contextlib.contextmanager
def held(
    path: Path, timeout: Optional[float] = None, on_wait: Optional[Callable[[Optional[str]], None]] = None
) -> Iterator[None]:
    """``with held(path): ...``: :func:`acquire`, then :func:`release` whatever happens."""
    acquire(path, timeout, on_wait)
    try:
        yield
    finally:
        release(path)
