"""Stored objects of the Responses and Conversations APIs: JSON records with an ordered list of items.

The edge decides what a record means (a stored response, a conversation, a background response's event log); the
store only keeps it, scoped to the API key hash that created it (another key's object is simply absent), for the
configured retention, and at most `max_stored_per_api_key` objects of one kind per key. Two implementations of one
contract (tests/integration/test_object_store.py runs it on both): in memory, and on the Redis-protocol server the
session store uses (services/sessions/redis_objects.py), which every registry and so every edge shares.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.config import SessionsConfig
from services.common.errors import ConflictError, InvalidRequestError, QuotaExceededError


@dataclass(frozen=True, slots=True)
class StoredItem:
    id: str
    payload: str


@dataclass(frozen=True, slots=True)
class StoredObject:
    kind: str
    id: str
    payload: str
    # The session holding the object's conversation state ("" when none): ending it frees that state.
    session_id: str
    created_at: float
    expires_at: float

    @property
    def etag(self) -> str:
        """The payload's SHA-1 (hex): what a conditional update compares (the Redis store's Lua computes the same)."""
        return payload_etag(self.payload)


def payload_etag(payload: str) -> str:
    return hashlib.sha1(payload.encode()).hexdigest()  # a version tag, not a security boundary


def changed(kind: str, object_id: str) -> ConflictError:
    return ConflictError(f"The {kind} {object_id!r} changed since it was read; read it again.")


def quota_exceeded(kind: str, limit: int) -> QuotaExceededError:
    return QuotaExceededError(
        f"This API key already stores {limit} objects of kind {kind!r}; delete some, or wait for them to expire."
    )


def id_taken(kind: str, object_id: str) -> InvalidRequestError:
    return InvalidRequestError(f"A {kind} with id {object_id!r} already exists.", code="already_exists")


class ObjectStore(ABC):
    """Every operation takes the caller's API key hash; an object of another key behaves as an unknown one."""

    def __init__(self, policy: SessionsConfig) -> None:
        self.policy = policy

    @abstractmethod
    async def create(
        self, owner: str, kind: str, object_id: str, payload: str, session_id: str, items: list[StoredItem]
    ) -> StoredObject:
        """Store a new object; QuotaExceededError beyond the per-key bound, InvalidRequestError if the id is taken."""

    @abstractmethod
    async def get(self, owner: str, kind: str, object_id: str) -> StoredObject | None: ...

    @abstractmethod
    async def update(
        self, owner: str, kind: str, object_id: str, payload: str, session_id: str = "", etag: str = ""
    ) -> StoredObject | None:
        """Replace the payload (and the session, when given); None when there is no such object. With `etag`, only
        if the object's is still that one, else ConflictError (a compare-and-set)."""

    @abstractmethod
    async def delete(self, owner: str, kind: str, object_id: str) -> StoredObject | None:
        """Remove the object and its items; the removed object, or None."""

    @abstractmethod
    async def append_items(self, owner: str, kind: str, object_id: str, items: list[StoredItem]) -> bool: ...

    @abstractmethod
    async def list_items(
        self, owner: str, kind: str, object_id: str, *, after: str = "", limit: int = 0, descending: bool = False
    ) -> tuple[list[StoredItem], bool] | None:
        """A page of items (after `after`, in the order asked) and whether more follow; None for no such object."""

    @abstractmethod
    async def get_item(self, owner: str, kind: str, object_id: str, item_id: str) -> StoredItem | None: ...

    @abstractmethod
    async def delete_item(self, owner: str, kind: str, object_id: str, item_id: str) -> bool: ...

    @abstractmethod
    async def close(self) -> None: ...


def page(ids: list[str], after: str, limit: int, descending: bool) -> tuple[list[str], bool]:
    """The ids of one page, in listing order; an unknown `after` gives an empty page (the cursor is gone)."""
    ordered = list(reversed(ids)) if descending else list(ids)
    if after:
        if after not in ordered:
            return [], False
        ordered = ordered[ordered.index(after) + 1 :]
    if limit and len(ordered) > limit:
        return ordered[:limit], True
    return ordered, False


@dataclass(slots=True)
class _Entry:
    owner: str
    payload: str
    session_id: str
    created_at: float
    expires_at: float
    items: dict[str, str] = field(default_factory=dict)


class InMemoryObjectStore(ObjectStore):
    """One registry's memory (`sessions.store: memory`). Atomic because nothing awaits inside an operation."""

    def __init__(self, policy: SessionsConfig, clock: Callable[[], float] = time.time) -> None:
        super().__init__(policy)
        self._clock = clock
        self._objects: dict[tuple[str, str], _Entry] = {}

    def _live(self, owner: str, kind: str, object_id: str) -> _Entry | None:
        entry = self._objects.get((kind, object_id))
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            del self._objects[(kind, object_id)]
            return None
        return entry if entry.owner == owner else None

    def _record(self, kind: str, object_id: str, e: _Entry) -> StoredObject:
        return StoredObject(kind, object_id, e.payload, e.session_id, e.created_at, e.expires_at)

    async def create(self, owner, kind, object_id, payload, session_id, items):
        now = self._clock()
        self._objects = {k: e for k, e in self._objects.items() if e.expires_at > now}
        if (kind, object_id) in self._objects:
            raise id_taken(kind, object_id)
        held = sum(1 for (k, _), e in self._objects.items() if k == kind and e.owner == owner)
        if held >= self.policy.max_stored_per_api_key:
            raise quota_exceeded(kind, self.policy.max_stored_per_api_key)
        entry = _Entry(owner, payload, session_id, now, now + self.policy.stored_retention_seconds)
        entry.items = {i.id: i.payload for i in items}
        self._objects[(kind, object_id)] = entry
        return self._record(kind, object_id, entry)

    async def get(self, owner, kind, object_id):
        entry = self._live(owner, kind, object_id)
        return None if entry is None else self._record(kind, object_id, entry)

    async def update(self, owner, kind, object_id, payload, session_id="", etag=""):
        entry = self._live(owner, kind, object_id)
        if entry is None:
            return None
        if etag and payload_etag(entry.payload) != etag:
            raise changed(kind, object_id)
        entry.payload = payload
        entry.session_id = session_id or entry.session_id
        return self._record(kind, object_id, entry)

    async def delete(self, owner, kind, object_id):
        entry = self._live(owner, kind, object_id)
        if entry is None:
            return None
        del self._objects[(kind, object_id)]
        return self._record(kind, object_id, entry)

    async def append_items(self, owner, kind, object_id, items):
        entry = self._live(owner, kind, object_id)
        if entry is None:
            return False
        entry.items.update((i.id, i.payload) for i in items)
        return True

    async def list_items(self, owner, kind, object_id, *, after="", limit=0, descending=False):
        entry = self._live(owner, kind, object_id)
        if entry is None:
            return None
        ids, more = page(list(entry.items), after, limit, descending)
        return [StoredItem(i, entry.items[i]) for i in ids], more

    async def get_item(self, owner, kind, object_id, item_id):
        entry = self._live(owner, kind, object_id)
        if entry is None or item_id not in entry.items:
            return None
        return StoredItem(item_id, entry.items[item_id])

    async def delete_item(self, owner, kind, object_id, item_id):
        entry = self._live(owner, kind, object_id)
        return entry is not None and entry.items.pop(item_id, None) is not None

    async def close(self):
        pass


def open_object_store(policy: SessionsConfig) -> ObjectStore:
    """The object store beside the session store named by `sessions.store`."""
    if policy.store == "memory":
        return InMemoryObjectStore(policy)
    from services.sessions.redis_objects import RedisObjectStore

    return RedisObjectStore(policy)
