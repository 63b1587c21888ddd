"""The on-disk data cache: its location, its lock (one process at a time prepares data in it; a
killed preparation never blocks later runs and leaves nothing behind), atomic cache entries, and
the cache keys."""

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

from .._locks import LockBusy, describe_holder, held
from .errors import DataError

_CACHE_VERSION = "1"
CACHE_LOCK_NAME = ".lock"
LOCK_TIMEOUT_ENV = "ZEROS_LM_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 3600.0
_WORK_PREFIX = "work-"
_TMP_MARK = ".tmp-"  # _atomic_save_dir's temporary directories

def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


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
def _cache_lock(cache_root: Path):
    """Hold the cache's lock: one process at a time prepares data in ``cache_root``.

    The lock dies with its owner (see ``_locks.py``), so a killed preparation never blocks later
    runs; a live owner is waited for, with a message, for at most :func:`lock_timeout` seconds.
    Once held, whatever a killed preparation left behind is removed (only the holder writes
    there): its ``work-*`` folder, half-written cache entries, and the processes it had forked
    (``datasets`` workers and managers; see :func:`_work_dir`).
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
def _work_dir(cache_root: Path):
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
    target = os.path.realpath(path)
    proc = Path("/proc")
    if not proc.is_dir():
        return
    for pid_dir in proc.glob("[0-9]*"):
        pid = int(pid_dir.name)
        if pid == os.getpid():
            continue
        try:
            holds = any(os.readlink(fd) == target for fd in (pid_dir / "fd").iterdir())
        except OSError:  # gone meanwhile, or another user's
            continue
        if holds:
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
        leftovers += [p for p in (cache_root / sub).glob(f"*{_TMP_MARK}*")]
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


_PARENT_WATCH_SET_IN: Optional[int] = None
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def _die_with(parent_pid: int) -> None:
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


def _atomic_save_dir(write_fn, final: Path) -> None:
    """Write a directory under a temporary name and rename it into place. If another process (a
    rank on another node sharing the cache) got there first, its result is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{_TMP_MARK}{os.uname().nodename}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_fn(str(tmp))
        if not final.exists():
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["CACHE_LOCK_NAME", "LOCK_TIMEOUT_ENV", "DEFAULT_LOCK_TIMEOUT_S", "default_cache_dir", "lock_timeout"]
