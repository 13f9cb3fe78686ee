"""A background response's stored record is written by several edges at once (its runner's heartbeat, a cancel,
its end, a stale mark): each write is a compare-and-set, so none is lost and a final status is written once.

The store is the registry's real in-memory object store behind a stand-in for the edge's gRPC client, which lets
a test land another edge's write between a read and the write that follows it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from edge.clients.stored_objects import RESPONSE, Stored
from edge.responses.background import TERMINAL, BackgroundRuns
from services.common.config import SessionsConfig
from services.common.errors import NotFoundError
from services.sessions.objects import InMemoryObjectStore

OWNER, ID = "k", "resp_" + "a" * 32


class Store:
    """The edge's StoredObjects on an in-memory store; `meanwhile` runs once, after the next read."""

    def __init__(self) -> None:
        self.objects = InMemoryObjectStore(SessionsConfig())
        self.meanwhile: Callable[[], object] | None = None

    async def get(self, owner: str, kind: int, object_id: str) -> Stored:
        found = await self.objects.get(owner, str(kind), object_id)
        if found is None:
            raise NotFoundError(object_id)
        stored = Stored(found.id, json.loads(found.payload), found.session_id, int(found.created_at), found.etag)
        if self.meanwhile is not None:
            write, self.meanwhile = self.meanwhile, None
            await write()
        return stored

    async def update(self, owner, kind, object_id, record, *, session_id="", etag="") -> Stored:
        found = await self.objects.update(owner, str(kind), object_id, json.dumps(record), session_id, etag)
        return Stored(found.id, json.loads(found.payload), found.session_id, int(found.created_at), found.etag)

    async def status(self) -> str:
        return json.loads((await self.objects.get(OWNER, str(RESPONSE), ID)).payload)["response"]["status"]

    async def set_status(self, status: str) -> None:
        """Another edge's write, straight to the store."""
        found = await self.objects.get(OWNER, str(RESPONSE), ID)
        record = json.loads(found.payload)
        record["response"]["status"] = status
        await self.objects.update(OWNER, str(RESPONSE), ID, json.dumps(record))


async def running_store() -> Store:
    store = Store()
    record = {"response": {"id": ID, "status": "in_progress"}, "heartbeat_at": 0}
    await store.objects.create(OWNER, str(RESPONSE), ID, json.dumps(record), "", [])
    return store


def beat(record: dict) -> dict | None:
    return None if record["response"]["status"] in TERMINAL else {**record, "heartbeat_at": 1}


async def test_a_heartbeat_never_writes_over_a_cancel_that_lands_between_its_read_and_write():
    store = await running_store()
    store.meanwhile = lambda: store.set_status("cancelled")
    stored = await BackgroundRuns(store).transition(OWNER, ID, beat)  # type: ignore[arg-type]
    # Before, the heartbeat wrote back the `in_progress` it had read, and the cancel was lost.
    assert stored.record["response"]["status"] == "cancelled" and await store.status() == "cancelled"


async def test_the_end_of_a_response_and_a_cancel_write_one_final_status():
    store = await running_store()
    runs = BackgroundRuns(store)  # type: ignore[arg-type]

    def cancel(record: dict) -> dict | None:
        if record["response"]["status"] in TERMINAL:
            return None
        return {**record, "response": {**record["response"], "status": "cancelled"}}

    store.meanwhile = lambda: store.set_status("completed")  # the generation ends as the cancel is written
    stored = await runs.transition(OWNER, ID, cancel)
    assert stored.record["response"]["status"] == "completed" and await store.status() == "completed"
    # And the other way round: a cancel that came first is not overwritten by the end.
    store = await running_store()
    runs = BackgroundRuns(store)  # type: ignore[arg-type]
    store.meanwhile = lambda: store.set_status("cancelled")
    end = {"response": {"id": ID, "status": "completed"}}
    stored = await runs.transition(OWNER, ID, lambda r: None if r["response"]["status"] in TERMINAL else end)
    assert stored.record["response"]["status"] == "cancelled" and await store.status() == "cancelled"
