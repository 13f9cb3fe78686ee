"""Session and conversation placement, expiry and drop delivery: the registry's logic, free of gRPC.

The registry holds no state of its own: every decision is one atomic call to the store (services/sessions/store.py),
so any number of registries can serve the same store. What the registry adds is delivery: when sessions end
(deleted, expired, evicted by the caps, replaced after a worker failure), it tells each worker that held one of their
conversations to drop the state, and acknowledges the drops the worker confirmed; the store keeps the others for the
worker's next lease renewal, whichever registry serves it.

Expiry runs in a sweeper that only the holder of the store's `sweeper` lease runs, so N registries do not race to
end the same sessions (ending twice would be harmless, only wasted work).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence

from services.common.errors import NotFoundError
from services.sessions import metrics
from services.sessions.objects import InMemoryObjectStore, ObjectStore, StoredObject
from services.sessions.store import ConversationPlacement, EndedSession, SessionRecord, SessionStore, WorkerRecord

log = logging.getLogger(__name__)

DropState = Callable[[str, str], Awaitable[bool]]  # (worker address, session id) -> delivered

SWEEPER_LEASE = "sweeper"


def session_not_found() -> NotFoundError:
    # One message for unknown, expired and foreign sessions alike: nothing about other sessions leaks.
    return NotFoundError("No such session.", param="ark_session_id", code="session_not_found")


class Registry:
    def __init__(self, store: SessionStore, *, on_drop: DropState, objects: ObjectStore | None = None) -> None:
        self.store = store
        # Stored responses and conversations (services/sessions/objects.py).
        self.objects = objects if objects is not None else InMemoryObjectStore(store.policy)
        self._on_drop = on_drop
        self._id = uuid.uuid4().hex  # this registry, as a lease holder
        self._deliveries: set[asyncio.Task[None]] = set()

    # -- workers --------------------------------------------------------------------------------------------------

    async def renew_lease(
        self,
        name: str,
        address: str,
        models: tuple[str, ...],
        capacity: int,
        incarnation: str,
        lease_seconds: float,
    ) -> tuple[WorkerRecord, list[str]]:
        """Register or renew a worker; returns its record (with its epoch) and the sessions it must still drop."""
        return await self.store.renew_worker(name, address, models, capacity, incarnation, lease_seconds)

    async def live_workers(self, model: str = "") -> list[WorkerRecord]:
        return await self.store.live_workers(model)

    # -- sessions and conversations -------------------------------------------------------------------------------

    async def place(
        self,
        api_key_hash: str,
        model: str,
        session_id: str,
        conversation_key: str,
        *,
        failed_worker: str = "",
        soonest: Sequence[str] = (),
    ) -> ConversationPlacement:
        """The session for a request and the worker for its conversation (see SessionStore.place)."""
        result = await self.store.place(
            api_key_hash,
            model,
            session_id,
            conversation_key,
            new_session_id=str(uuid.uuid4()),
            failed_worker=failed_worker,
            soonest=soonest,
        )
        metrics.PLACEMENTS.labels("placed" if result.placement.placed_now else "kept").inc()
        if result.ended:
            # Off the request path: the request needs only the placement.
            self._deliver_later(result.ended, "evicted_or_replaced")
        return result.placement

    async def get(self, session_id: str, api_key_hash: str) -> SessionRecord:
        session = await self.store.get_session(session_id, api_key_hash)
        if session is None:
            raise session_not_found()
        return session

    async def delete(self, session_id: str, api_key_hash: str) -> None:
        """End a session now; its workers are told before this returns (when they can be reached)."""
        ended = await self.store.end_session(session_id, api_key_hash)
        if ended is None:
            raise session_not_found()
        await self._deliver([ended], "deleted")

    async def delete_object(self, owner: str, kind: str, object_id: str) -> StoredObject | None:
        """Delete a stored object; the session holding its conversation state ends with it, so every worker drops
        that state from every tier (a continuation of another object of that session recomputes, never fails)."""
        removed = await self.objects.delete(owner, kind, object_id)
        if removed is not None and removed.session_id:
            ended = await self.store.end_session(removed.session_id, owner)
            if ended is not None:
                await self._deliver([ended], "deleted")
        return removed

    async def sweep(self) -> int:
        """End expired sessions if this registry holds the sweeper lease; returns how many it ended."""
        if not await self.store.hold_lease(SWEEPER_LEASE, self._id, 3 * SWEEP_INTERVAL_SECONDS):
            return 0
        ended = await self.store.end_expired()
        await self._deliver(ended, "expired")
        return len(ended)

    # -- telling workers ------------------------------------------------------------------------------------------

    def _deliver_later(self, ended: list[EndedSession], reason: str) -> None:
        task = asyncio.create_task(self._deliver(ended, reason))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, ended: list[EndedSession], reason: str) -> None:
        metrics.SESSIONS_ENDED.labels(reason).inc(len(ended))
        for session in ended:
            for name, address in session.workers:
                try:
                    delivered = await self._on_drop(address, session.id)
                except Exception:
                    delivered = False
                if delivered:
                    metrics.DROPS_DELIVERED.inc()
                    await self.store.ack_drop(name, session.id)

    async def close(self) -> None:
        for task in list(self._deliveries):
            task.cancel()
        await self.store.close()
        await self.objects.close()


SWEEP_INTERVAL_SECONDS = 1.0


async def sweep_forever(registry: Registry, interval: float = SWEEP_INTERVAL_SECONDS) -> None:
    """Expire idle and over-age sessions, freeing their workers' state; a store outage only delays it."""
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await registry.sweep()
        except Exception:  # the store is down: UnavailableError was logged once by the store
            continue
        if expired:
            log.info("expired %d session(s)", expired)
