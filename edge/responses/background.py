"""Background responses: run by the edge that received them, visible to every edge through the stored objects.

- Creating one stores it `queued` with an empty event log (a second stored object, same id) and returns at once; a
  task on this edge runs the generation and appends each event to the log (in batches, every FLUSH_SECONDS), so any
  edge can resume the stream from `starting_after`.
- While it runs, the task rewrites the stored response every HEARTBEAT_SECONDS (its `heartbeat_at`) and reads back
  whether it was cancelled; a cancel from any edge marks the stored response `cancelled`, and the task aborts the
  generation on its worker within one heartbeat.
- A response never stays `in_progress` after the process running it is gone: a worker that dies ends the
  generation with an error (the response ends `failed`); an edge that stops cleanly marks its running responses
  `failed`; an edge that is killed stops its heartbeat, and the first read after STALE_SECONDS without one (from
  any edge) marks the response `failed` with the reason.
- Several edges write one stored response (its heartbeat, a cancel, its end, a stale mark), each a read-modify-
  write: every one is a compare-and-set on the version read (`transition`, the registry's etag), retried on a
  concurrent write, and none writes over a final status. So the final status is written once: a cancel that
  lands as the generation ends either wins (the end is not stored) or finds the response finished (a 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from edge.clients.stored_objects import RESPONSE, RESPONSE_EVENTS, Stored, StoredObjects
from edge.responses.schemas import Event, Response, ResponseError
from services.common.errors import ArkError, ConflictError, UnavailableError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
FLUSH_SECONDS = 0.1
# Several heartbeats: a busy machine may delay one, never this many.
STALE_SECONDS = 15.0
POLL_SECONDS = 0.1
# Writers of one response: its runner's heartbeat, a cancel, a stale mark; a few retries always settle them.
TRANSITION_ATTEMPTS = 8
TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def stale(record: dict[str, Any], now: float) -> bool:
    """Whether a running response lost the process running it (no heartbeat for STALE_SECONDS)."""
    status = record["response"]["status"]
    return status not in TERMINAL and now - record.get("heartbeat_at", now) > STALE_SECONDS


def failed_record(record: dict[str, Any], message: str) -> dict[str, Any]:
    response = Response.model_validate(record["response"])
    response.status = "failed"
    response.error = ResponseError(code="server_error", message=message)
    return {**record, "response": response.model_dump(mode="json")}


def _fail_unless_final(message: str) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    return lambda record: None if record["response"]["status"] in TERMINAL else failed_record(record, message)


class BackgroundRuns:
    """The background responses this edge runs."""

    def __init__(self, stored: StoredObjects) -> None:
        self._stored = stored
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()

    async def begin(
        self, owner: str, response: Response, record: dict[str, Any], items: list[tuple[str, dict]]
    ) -> None:
        """Store the queued response and its empty event log."""
        record = {**record, "response": response.model_dump(mode="json"), "heartbeat_at": time.time()}
        await self._stored.create(owner, RESPONSE, response.id, record, items=items)
        await self._stored.create(owner, RESPONSE_EVENTS, response.id, {})

    def run(self, owner: str, response_id: str, events: Callable[[], AsyncIterator[Event | None]]) -> None:
        task = asyncio.create_task(self._run(owner, response_id, events))
        self._tasks[response_id] = task

        def forget(_: object) -> None:
            self._tasks.pop(response_id, None)
            self._cancelled.discard(response_id)

        task.add_done_callback(forget)

    async def _run(self, owner: str, response_id: str, events: Callable[[], AsyncIterator[Event | None]]) -> None:
        pending: list[tuple[str, dict]] = []
        last_flush = 0.0
        watcher = asyncio.create_task(self._watch(owner, response_id))
        try:
            async for event in events():
                if event is None:
                    continue
                if event.type == "response.in_progress":
                    await self._mark_in_progress(owner, response_id)
                pending.append((str(event.sequence_number), event.model_dump(mode="json")))
                now = time.monotonic()
                if event.type in FINAL_EVENTS or now - last_flush >= FLUSH_SECONDS:
                    await self._stored.append_items(owner, RESPONSE_EVENTS, response_id, pending)
                    pending, last_flush = [], now
        except asyncio.CancelledError:
            if response_id in self._cancelled:
                return  # cancelled by a client: the generation is aborted (closing `events`), the store says so
            # The edge is stopping: the response ends `failed`, never stays in progress.
            with contextlib.suppress(ArkError, asyncio.CancelledError):
                await self.transition(
                    owner, response_id, _fail_unless_final("The server running this response stopped.")
                )
            raise
        except ArkError as exc:
            log.warning("background response %s: %s", response_id, exc.message)
        finally:
            watcher.cancel()

    async def transition(
        self,
        owner: str,
        response_id: str,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
        *,
        session_id: str = "",
    ) -> Stored:
        """Apply `change` to the stored record as one compare-and-set, re-read and retried after a concurrent write;
        the record as stored after it. `change` returns the new record, or None to leave it as it is (it is final
        already, say). `session_id`, when given, is stored with the new record."""
        for _ in range(TRANSITION_ATTEMPTS):
            stored = await self._stored.get(owner, RESPONSE, response_id)
            record = change(stored.record)
            if record is None:
                return stored
            try:
                return await self._stored.update(
                    owner, RESPONSE, response_id, record, session_id=session_id, etag=stored.etag
                )
            except ConflictError:
                continue
        raise UnavailableError(f"The response {response_id} is being written by others; retry.")

    async def _mark_in_progress(self, owner: str, response_id: str) -> None:
        def start(record: dict[str, Any]) -> dict[str, Any] | None:
            response = record["response"]
            if response["status"] != "queued":  # cancelled already
                return None
            return {**record, "response": {**response, "status": "in_progress"}, "heartbeat_at": time.time()}

        await self.transition(owner, response_id, start)

    async def _watch(self, owner: str, response_id: str) -> None:
        """Heartbeat, and abort the generation when another edge (or this one) cancelled the response."""

        def beat(record: dict[str, Any]) -> dict[str, Any] | None:
            return None if record["response"]["status"] in TERMINAL else {**record, "heartbeat_at": time.time()}

        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                stored = await self.transition(owner, response_id, beat)
                if stored.record["response"]["status"] == "cancelled":
                    self._cancelled.add(response_id)
                    if (task := self._tasks.get(response_id)) is not None:
                        task.cancel()  # closing the event generator cancels the call: the worker aborts
                    return
                if stored.record["response"]["status"] in TERMINAL:
                    return
            except ArkError as exc:
                log.warning("background response %s: heartbeat failed: %s", response_id, exc.message)

    async def replay(self, owner: str, response_id: str, starting_after: int | None) -> AsyncIterator[dict[str, Any]]:
        """The stored events after `starting_after`, then the new ones as they are stored, until the last."""
        after = "" if starting_after is None else str(starting_after)
        while True:
            items, _ = await self._stored.list_items(owner, RESPONSE_EVENTS, response_id, after=after)
            for item in items:
                yield item
                after = str(item["sequence_number"])
                if item["type"] in FINAL_EVENTS:
                    return
            if not items:
                stored = await self.current(owner, response_id)
                if stored.record["response"]["status"] in TERMINAL:
                    return
                await asyncio.sleep(POLL_SECONDS)

    async def current(self, owner: str, response_id: str) -> Stored:
        """The stored response, marked failed first if the process running it is gone."""
        stored = await self._stored.get(owner, RESPONSE, response_id)
        if not stale(stored.record, time.time()):
            return stored
        gone = "The server running this response stopped before it finished."
        return await self.transition(
            owner, response_id, lambda r: failed_record(r, gone) if stale(r, time.time()) else None
        )

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
