"""Session placement and expiry: the registry's logic, free of gRPC.

Workers hold leases they renew; a session is placed on a live worker serving its model, preferring spare
capacity; sessions end after an idle timeout or a maximum age, and per-API-key and global caps evict the least
recently used session first. Whenever a session ends, its worker is told to drop the state (`on_drop`); a worker
that cannot be reached learns it on its next lease renewal.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable

from services.common.config import SessionsConfig
from services.common.errors import NotFoundError, UnavailableError
from services.sessions.store import SessionRecord, SessionStore, WorkerRecord

log = logging.getLogger(__name__)

DropState = Callable[[str, str], Awaitable[bool]]  # (worker address, session id) -> delivered


def session_not_found() -> NotFoundError:
    # One message for unknown, expired and foreign sessions alike: nothing about other sessions leaks.
    return NotFoundError("No such session.", param="ark_session_id", code="session_not_found")


class Registry:
    def __init__(
        self, store: SessionStore, policy: SessionsConfig, *, on_drop: DropState, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._policy = policy
        self._on_drop = on_drop
        self._clock = clock
        self._pending_drops: dict[str, set[str]] = defaultdict(set)  # worker name -> session ids

    # -- workers --------------------------------------------------------------------------------------------------

    def renew_lease(
        self, name: str, address: str, models: tuple[str, ...], capacity: int, lease_seconds: float
    ) -> tuple[WorkerRecord, list[str]]:
        """Register or renew a worker; returns its record and the sessions it must still drop."""
        record = WorkerRecord(name, address, models, capacity, self._clock() + lease_seconds)
        self._store.put_worker(record)
        dropped = sorted(self._pending_drops.pop(name, set()))
        return record, dropped

    def live_workers(self, model: str = "") -> list[WorkerRecord]:
        now = self._clock()
        return [w for w in self._store.workers() if w.lease_expires_at > now and (not model or model in w.models)]

    def placed_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for s in self._store.sessions():
            counts[s.worker_name] += 1
        return counts

    def _place(self, model: str, avoid: str = "") -> WorkerRecord:
        candidates = [w for w in self.live_workers(model) if w.name != avoid] or self.live_workers(model)
        if not candidates:
            raise UnavailableError(f"No live chat worker serves {model!r}.")
        counts = self.placed_counts()
        # Least loaded relative to capacity; ties broken by name for stable placement.
        return min(candidates, key=lambda w: (counts[w.name] / max(1, w.session_capacity), counts[w.name], w.name))

    # -- sessions -------------------------------------------------------------------------------------------------

    def expires_at(self, session: SessionRecord) -> float:
        return min(
            session.last_used_at + self._policy.idle_timeout_seconds, session.created_at + self._policy.max_age_seconds
        )

    async def create(self, api_key_hash: str, model: str, *, avoid_worker: str = "") -> SessionRecord:
        worker = self._place(model, avoid_worker)
        await self._enforce_caps(api_key_hash)
        now = self._clock()
        session = SessionRecord(str(uuid.uuid4()), api_key_hash, model, worker.name, worker.address, now, now)
        self._store.put_session(session)
        return session

    def get(self, session_id: str, api_key_hash: str, *, touch: bool = True) -> SessionRecord:
        session = self._store.get_session(session_id)
        if session is None or session.api_key_hash != api_key_hash or self.expires_at(session) <= self._clock():
            raise session_not_found()
        if touch:
            session.last_used_at = self._clock()
            self._store.put_session(session)
        return session

    async def replace(self, session_id: str, api_key_hash: str, failed_worker: str) -> SessionRecord:
        """The session's worker is gone: end it and open a new one elsewhere (a new id, hence a new cookie)."""
        old = self.get(session_id, api_key_hash, touch=False)
        await self._end(old)
        return await self.create(api_key_hash, old.model, avoid_worker=failed_worker or old.worker_name)

    async def delete(self, session_id: str, api_key_hash: str) -> None:
        await self._end(self.get(session_id, api_key_hash, touch=False))

    async def sweep(self) -> int:
        """End every expired session; returns how many."""
        now = self._clock()
        expired = [s for s in self._store.sessions() if self.expires_at(s) <= now]
        for session in expired:
            await self._end(session)
        return len(expired)

    async def _enforce_caps(self, api_key_hash: str) -> None:
        sessions = sorted(self._store.sessions(), key=lambda s: s.last_used_at)
        mine = [s for s in sessions if s.api_key_hash == api_key_hash]
        while len(mine) >= self._policy.max_per_api_key:
            victim = mine.pop(0)
            sessions.remove(victim)
            await self._end(victim)
        while len(sessions) >= self._policy.max_total:
            await self._end(sessions.pop(0))

    async def _end(self, session: SessionRecord) -> None:
        if self._store.delete_session(session.id) is None:
            return
        try:
            delivered = await self._on_drop(session.worker_address, session.id)
        except Exception:
            delivered = False
        if not delivered:
            self._pending_drops[session.worker_name].add(session.id)
