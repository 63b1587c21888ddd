"""The on-disk data cache: its location, its lock (one process at a time prepares data in it; a
killed preparation never blocks later runs and leaves nothing behind), the cleanup of its
half-written entries (written with :func:`zeros_lm.atomic.atomic_write_dir`), and the cache keys."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .._locks import LockBusy, describe_holder, held, processes_holding
from ..atomic import TMP_MARK
from .errors import DataError

CACHE_VERSION = "1"  # part of every cache key: raise it when what the cache holds changes
CACHE_LOCK_NAME = ".lock"
LOCK_TIMEOUT_ENV = "ZEROS_LM_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 3600.0
_WORK_PREFIX = "work-"
CACHE_KEY_CHARS = 20  # hex digits of the hash that names a cache entry


def cache_key(*parts: Any) -> str:
    """The name of a cache entry: a hash of ``parts`` (anything JSON can write, else its ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:CACHE_KEY_CHARS]


def lock_timeout() -> float:
    """Seconds to wait for another process preparing data in the same cache (``$ZEROS_LM_LOCK_TIMEOUT``)."""
    value = os.environ.get(LOCK_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


@contextlib.contextmanager
def cache_lock(cache_root: Path):
    """Hold the cache's lock: one process at a time prepares data in ``cache_root``.

    The lock dies with its owner (see ``_locks.py``), so a killed preparation never blocks later
    runs; a live owner is waited for, with a message, for at most :func:`lock_timeout` seconds.
    Once held, whatever a killed preparation left behind is removed (only the holder writes
    there): its ``work-*`` folder, half-written cache entries, and the processes it had forked
    (``datasets`` workers and managers; see :func:`work_dir`).
    """
    path = cache_root / CACHE_LOCK_NAME
    timeout = lock_timeout()

    def waiting(holder):
        print(
            f"Waiting for {describe_holder(holder)}, which is preparing data in the cache {cache_root} "
            f"(up to {timeout:.0f} s; {LOCK_TIMEOUT_ENV} sets the limit) ...",
            file=sys.stderr,
            flush=True,
        )

    try:
        with held(path, timeout=timeout, on_wait=waiting):
            _remove_leftovers(cache_root)
            yield
    except LockBusy as e:
        raise DataError(
            f"the data cache {cache_root} is still locked by {describe_holder(e.holder)} after {timeout:.0f} s "
            f"(lock file {path}); wait for that run to finish or stop it, use another --data.cache_dir, or "
            f"set {LOCK_TIMEOUT_ENV}=SECONDS to wait longer"
        ) from None


_OWNER_FILE = "owner"


@contextlib.contextmanager
def work_dir(cache_root: Path):
    """A fresh ``work-<pid>-<ms>`` folder for ``datasets``' intermediate files, removed afterwards.

    The preparing process keeps its ``owner`` file open while it works; every process it forks
    inherits that descriptor. If the preparation is killed, the next holder of the cache lock finds
    the processes still holding the file (orphaned workers, a ``datasets`` manager) and ends them.
    """
    work = cache_root / f"{_WORK_PREFIX}{os.getpid()}-{int(time.time() * 1000)}"
    work.mkdir(parents=True)
    fd = os.open(work / _OWNER_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        yield work
    finally:
        os.close(fd)
        shutil.rmtree(work, ignore_errors=True)


def _kill_processes_holding(path: Path) -> None:
    """SIGKILL every other process with ``path`` open (Linux: read from /proc; elsewhere a no-op)."""
    for pid in processes_holding(path) or []:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _remove_leftovers(cache_root: Path) -> None:
    """What preparations that were killed left behind (call with the lock held): their work
    folders and forked processes, and temporary cache entries."""
    leftovers = list(cache_root.glob(_WORK_PREFIX + "*"))
    for work in leftovers:
        if (work / _OWNER_FILE).exists():
            _kill_processes_holding(work / _OWNER_FILE)
    for sub in ("tokenizers", "data"):
        # (with the lock held no one else is writing: every temporary entry there is a leftover)
        leftovers += [p for p in (cache_root / sub).glob(f"*{TMP_MARK}*")]
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


_PARENT_WATCH_SET_IN: Optional[int] = None
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def die_with(parent_pid: int) -> None:
    """In a worker process of ``datasets`` (forked from the preparing process ``parent_pid``): be
    killed when that process dies, instead of living on as an orphan. Linux only; a no-op in the
    preparing process itself and elsewhere."""
    global _PARENT_WATCH_SET_IN
    pid = os.getpid()
    if pid == parent_pid or _PARENT_WATCH_SET_IN == pid or not sys.platform.startswith("linux"):
        return
    _PARENT_WATCH_SET_IN = pid
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the request was made
        os._exit(1)


def default_cache_dir() -> str:
    return os.environ.get("ZEROS_LM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zeros_lm")


__all__ = [
    "CACHE_VERSION",
    "CACHE_LOCK_NAME",
    "LOCK_TIMEOUT_ENV",
    "DEFAULT_LOCK_TIMEOUT_S",
    "cache_key",
    "cache_lock",
    "default_cache_dir",
    "die_with",
    "lock_timeout",
    "work_dir",
]
