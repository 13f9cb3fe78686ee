"""Fair, bounded admission to a fixed number of execution slots.

An engine that can run `slots` requests at once admits the rest first-come first-served; once `max_queue`
requests are already waiting, a new one is refused at once with OverloadedError (gRPC RESOURCE_EXHAUSTED, HTTP 429)
rather than piling up latency nobody will wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from services.common.errors import OverloadedError


class Admission:
    def __init__(self, slots: int, max_queue: int) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self._free = slots
        self._max_queue = max_queue
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> bool:
        return self._free == 0

    @contextlib.asynccontextmanager
    async def slot(self, *, priority: bool = False) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block; waits in FIFO order.

        `priority` is for short housekeeping (dropping a session's state): it goes first and is never refused.
        """
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: bool = False) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if not priority and len(self._waiters) >= self._max_queue:
            raise OverloadedError(
                f"The server is busy: {len(self._waiters)} requests are already queued for this model. Retry shortly."
            )
        waiter = asyncio.get_running_loop().create_future()
        if priority:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release()
            else:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over directly, keeping FIFO order
                return
        self._free += 1
