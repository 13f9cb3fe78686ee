"""Resident session state on a chat worker: a fixed pool of engine contexts, least recently used evicted first.

The pool size comes from the worker's memory budget, so memory is bounded however many sessions exist; a session
whose context was evicted (or expired, or dropped by the registry) simply gets a fresh one and recomputes, which
costs time, never an error. Engine-agnostic: a context is whatever the engine keeps state in.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.chat.transcript import Transcript

C = TypeVar("C")


@dataclass(slots=True)
class Resident(Generic[C]):
    """One session's state on this worker."""

    session_id: str
    api_key_hash: str
    context: C
    idle_timeout: float
    last_used: float
    transcript: Transcript | None = None


class SessionPool(Generic[C]):
    def __init__(self, contexts: list[C], reset: Callable[[C], None], clock: Callable[[], float] = time.monotonic):
        self._free = list(contexts)
        self._capacity = len(contexts)
        self._reset = reset
        self._clock = clock
        self._residents: OrderedDict[str, Resident[C]] = OrderedDict()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def resident(self) -> int:
        return len(self._residents)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._residents

    def checkout(self, session_id: str, api_key_hash: str, idle_timeout: float) -> Resident[C]:
        """The session's state, or a fresh context for it (taking a free one or evicting the least recent)."""
        resident = self._residents.get(session_id)
        if resident is not None and resident.api_key_hash != api_key_hash:
            self.drop(session_id)  # never hand one key's state to another
            resident = None
        if resident is None:
            if not self._free:
                _, victim = self._residents.popitem(last=False)
                self._release(victim)
            resident = Resident(session_id, api_key_hash, self._free.pop(), idle_timeout, self._clock())
            self._residents[session_id] = resident
        self._residents.move_to_end(session_id)
        resident.last_used = self._clock()
        resident.idle_timeout = idle_timeout or resident.idle_timeout
        return resident

    def drop(self, session_id: str) -> bool:
        resident = self._residents.pop(session_id, None)
        if resident is None:
            return False
        self._release(resident)
        return True

    def expire_idle(self) -> list[str]:
        now = self._clock()
        expired = [sid for sid, r in self._residents.items() if r.idle_timeout and now - r.last_used > r.idle_timeout]
        for session_id in expired:
            self.drop(session_id)
        return expired

    def _release(self, resident: Resident[C]) -> None:
        resident.transcript = None
        self._reset(resident.context)
        self._free.append(resident.context)
