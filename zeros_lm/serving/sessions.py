"""Sessions: a conversation's recurrent state kept between requests, spilled to state files when idle.

A session is its cache (the model's state after reading ``history[:read]``) and its history: every token
of the conversation so far, of which ``history[read:]`` (usually the last generated token) is pending:
in the conversation, not yet in the state. The next request reads the pending tokens first.

At most ``max_sessions`` idle sessions stay in memory; beyond that the least recently used go to state
files ``STATE_DIR/<session_id>.state`` (``ZeroSCache.save``, the history in its metadata) and come back
on their next request, also after a restart. Without a state directory they are dropped.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import mmap
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from zeros_lm.cache_zeros import ZeroSCache

logger = logging.getLogger("zeros_lm.serve")

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
STATE_SUFFIX = ".state"
HISTORY_KEY = "zeros_lm.serve.history"  # state-file metadata: the history, int32 little-endian, base64
READ_KEY = "zeros_lm.serve.read"  # state-file metadata: how many history tokens the state has read
HISTORY_DTYPE = torch.int32


class SessionBusy(Exception):
    """The session is answering another request."""


class BadSessionId(ValueError):
    pass


def check_session_id(session_id: str) -> None:
    if not SESSION_ID_PATTERN.match(session_id):
        raise BadSessionId(
            f"session_id {session_id!r} is not valid: use 1-128 letters, digits, '_', '-' or '.', starting with a "
            "letter or digit"
        )


@dataclasses.dataclass
class SessionState:
    cache: ZeroSCache | None  # None: nothing read yet
    history: torch.Tensor  # (N,) int32, CPU: the conversation's tokens
    read: int  # history[:read] is in the cache

    @property
    def pending(self) -> list[int]:
        return self.history[self.read:].tolist()

    @property
    def nbytes(self) -> int:
        return (self.cache.nbytes if self.cache is not None else 0) + self.history.numel() * self.history.element_size()

    @staticmethod
    def tokens(ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=HISTORY_DTYPE)

    def parked(self) -> "SessionState":
        """The same session with its state and history copied into one memory mapping of their size (CPU
        tensors only; otherwise this one): an idle session then costs its state, not the holes its tensors
        leave in the allocator's heap between the temporaries of the steps that made them (about 20% more)."""
        tensors = [self.history]
        if self.cache is not None:
            self.cache.map(lambda x: tensors.append(x) or x)  # (only lists them)
        if any(x.device.type != "cpu" for x in tensors):
            return self
        mapping = _Mapping(sum(x.numel() * x.element_size() for x in tensors) + len(tensors) * PARK_ALIGN)
        cache = None if self.cache is None else self.cache.map(mapping.put)
        return SessionState(cache, mapping.put(self.history), self.read)


PARK_ALIGN = 64  # bytes: where each tensor of a parked session starts (the CPU allocator's alignment)


class _Mapping:
    """An anonymous memory mapping that tensors are copied into, one after the other; it is unmapped when the
    last of them is freed."""

    def __init__(self, nbytes: int):
        self._bytes = torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)  # keeps the mapping
        self._offset = 0

    def put(self, x: torch.Tensor) -> torch.Tensor:
        start = -(-self._offset // PARK_ALIGN) * PARK_ALIGN
        size = x.numel() * x.element_size()
        out = self._bytes[start : start + size].view(x.dtype).view(x.shape)
        out.copy_(x)
        self._offset = start + size
        return out


def _encode_history(history: torch.Tensor) -> str:
    return base64.b64encode(history.to(HISTORY_DTYPE).numpy().astype("<i4").tobytes()).decode("ascii")


def _decode_history(text: str) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<i4").astype("int32").copy())


class SessionStore:
    """Thread-safe: requests acquire a session (it is then busy) and the engine releases it with its new state."""

    def __init__(self, model, max_sessions: int, state_dir: str | os.PathLike | None, metrics=None):
        self.model = model
        self.max_sessions = max_sessions
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.metrics = metrics
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, SessionState] = OrderedDict()  # least recently used first
        self._busy: set[str] = set()
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)

    # -- files --------------------------------------------------------------------------------------
    def path(self, session_id: str) -> Path | None:
        return None if self.state_dir is None else self.state_dir / f"{session_id}{STATE_SUFFIX}"

    def _write(self, session_id: str, state: SessionState) -> bool:
        path = self.path(session_id)
        if path is None or state.cache is None:
            return False
        metadata = {HISTORY_KEY: _encode_history(state.history), READ_KEY: str(state.read)}
        state.cache.save(path, self.model, metadata=metadata, overwrite=True)  # its own earlier state
        return True

    def _read(self, session_id: str) -> SessionState | None:
        path = self.path(session_id)
        if path is None or not path.is_file():
            return None
        cache = ZeroSCache.load(path, self.model)
        state = SessionState(cache, _decode_history(cache.metadata[HISTORY_KEY]), int(cache.metadata[READ_KEY]))
        cache.metadata = {}
        if self.metrics is not None:
            self.metrics.session_restores.inc()
        return state

    # -- requests -----------------------------------------------------------------------------------
    def acquire(self, session_id: str) -> SessionState | None:
        """The session's state (None for a new session), marked busy until :meth:`release`."""
        check_session_id(session_id)
        with self._lock:
            if session_id in self._busy:
                raise SessionBusy(f"session {session_id!r} is answering another request; retry when it has finished")
            self._busy.add(session_id)
            state = self._memory.pop(session_id, None)
        if state is None:
            try:
                state = self._read(session_id)
            except BaseException:
                with self._lock:
                    self._busy.discard(session_id)
                raise
        return state

    def release(self, session_id: str, state: SessionState | None) -> None:
        """Keep ``state`` as the session's (None: keep what the file holds, if anything); spill the excess."""
        if state is not None:
            state = state.parked()
        with self._lock:
            self._busy.discard(session_id)
            if state is not None:
                self._memory[session_id] = state
                self._memory.move_to_end(session_id)
            victims = []
            while len(self._memory) > self.max_sessions:
                victims.append(self._memory.popitem(last=False))
            self._busy.update(sid for sid, _ in victims)
        for sid, victim in victims:
            try:
                written = self._write(sid, victim)
                if self.metrics is not None:
                    (self.metrics.session_spills if written else self.metrics.session_drops).inc()
            except Exception as e:  # noqa: BLE001 - a failed write loses this session only
                logger.error("could not write the state of session %r: %s", sid, e)
            finally:
                with self._lock:
                    self._busy.discard(sid)

    def info(self, session_id: str) -> dict | None:
        check_session_id(session_id)
        with self._lock:
            state = self._memory.get(session_id)
            busy = session_id in self._busy
        if state is not None:
            return {"id": session_id, "object": "session", "where": "memory", "tokens": int(state.history.numel()),
                    "state_bytes": state.nbytes, "busy": busy}
        path = self.path(session_id)
        if path is not None and path.is_file():
            return {"id": session_id, "object": "session", "where": "disk", "state_file_bytes": path.stat().st_size,
                    "busy": busy}
        if busy:
            return {"id": session_id, "object": "session", "where": "active", "busy": True}
        return None

    def delete(self, session_id: str) -> bool:
        check_session_id(session_id)
        with self._lock:
            if session_id in self._busy:
                raise SessionBusy(f"session {session_id!r} is answering a request; delete it when it has finished")
            found = self._memory.pop(session_id, None) is not None
        path = self.path(session_id)
        if path is not None and path.is_file():
            path.unlink()
            found = True
        return found

    def save_all(self) -> int:
        """Write every session held in memory to its state file (on shutdown); returns how many."""
        with self._lock:
            items = list(self._memory.items())
        written = 0
        for sid, state in items:
            try:
                written += self._write(sid, state)
            except Exception as e:  # noqa: BLE001
                logger.error("could not write the state of session %r: %s", sid, e)
        return written

    @property
    def in_memory(self) -> int:
        with self._lock:
            return len(self._memory)

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._memory.values())
