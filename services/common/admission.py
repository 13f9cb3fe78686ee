"""Fair, bounded admission to a fixed number of execution slots, by queue length and by expected wait.

An engine that can run `slots` requests at once admits the rest first-come first-served. A request is refused at
once, before any expensive work (tokenising, audio decoding), with OverloadedError (gRPC RESOURCE_EXHAUSTED, HTTP
429 with `Retry-After`) when

- `max_queue` requests are already waiting, or
- the wait it can expect exceeds `max_wait_seconds`: the requests ahead of it times the average time a request
  holds a slot (an exponentially weighted mean of the recent ones), divided by the slots. A queue of short requests
  stays open; the same length of long ones does not, which a length bound alone cannot tell apart. For an engine
  that batches (the llama.cpp engine decodes its `slots` sequences in one step) the hold time is measured under
  that batching, so `hold / slots` is the time per request at the engine's real throughput.

The estimate can be wrong (a run of unusually long requests), so a request still waiting after `max_wait_seconds`
is refused then too: nobody waits past the bound, and a proxy's idle timeout never cuts a queued request.

`close()` (a worker shutting down: its server is given the admissions to close, services/common/server.py `serve`)
refuses the waiting requests and every new one with UnavailableError: they were not started, so the edge can send
them to another worker.

Queue waits and refusals are Prometheus metrics (`ark_queue_wait_seconds`, `ark_admission_rejected_total`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator

from services.common.errors import ArkError, OverloadedError, UnavailableError
from services.common.metrics import ADMISSION_REJECTED, QUEUE_WAIT

# Weight of the newest hold time in the running mean: about the last ten requests count.
_EWMA_WEIGHT = 0.2


class Admission:
    def __init__(self, slots: int, max_queue: int, *, max_wait_seconds: float | None = None, name: str = "") -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self._slots = slots
        self._free = slots
        self._max_queue = max_queue
        self._max_wait = max_wait_seconds
        self._name = name or "default"
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._mean_hold: float | None = None  # seconds a request holds a slot, on average (None: nothing seen yet)
        self._closed: ArkError | None = None

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> bool:
        return self._free == 0

    @property
    def slots(self) -> int:
        """Requests served at once."""
        return self._slots

    @property
    def running(self) -> int:
        """Slots held now."""
        return self._slots - self._free

    def expected_wait(self, ahead: int | None = None) -> float:
        """Seconds a request arriving now can expect to wait for a slot (0 when one is free)."""
        ahead = len(self._waiters) if ahead is None else ahead
        if self._free > 0 and not ahead:
            return 0.0
        if self._mean_hold is None:
            return 0.0  # nothing measured yet: no grounds to refuse
        return (ahead + 1) * self._mean_hold / self._slots

    @contextlib.asynccontextmanager
    async def slot(self, *, priority: bool = False) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block; waits in FIFO order.

        `priority` is for short housekeeping (dropping a session's state): it goes first, is never refused and does
        not count towards the mean hold time.
        """
        await self._acquire(priority)
        held_since = time.perf_counter()
        try:
            yield
        finally:
            self._release()
            if not priority:
                self._record_hold(time.perf_counter() - held_since)

    def close(self, error: ArkError | None = None) -> None:
        """Refuse every waiting and future request with `error` (default: this worker is shutting down)."""
        self._closed = error or UnavailableError(
            "The server is shutting down and not accepting new requests. Retry shortly.", code="server_shutting_down"
        )
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._closed)
                ADMISSION_REJECTED.labels(self._name, "shutting_down").inc()

    def _record_hold(self, seconds: float) -> None:
        mean = self._mean_hold
        self._mean_hold = seconds if mean is None else mean + _EWMA_WEIGHT * (seconds - mean)

    async def _acquire(self, priority: bool = False) -> None:
        if self._closed is not None and not priority:
            ADMISSION_REJECTED.labels(self._name, "shutting_down").inc()
            raise self._closed
        if self._free > 0 and not self._waiters:
            self._free -= 1
            QUEUE_WAIT.labels(self._name).observe(0.0)
            return
        if not priority:
            if len(self._waiters) >= self._max_queue:
                raise refusal(
                    self._name,
                    "queue_full",
                    f"The server is busy: {len(self._waiters)} requests are already queued for this model. "
                    "Retry shortly.",
                    self.expected_wait() - (self._max_wait or 0.0),
                )
            expected = self.expected_wait()
            if self._max_wait is not None and expected > self._max_wait:
                raise wait_too_long(self._name, expected, self._max_wait)
        waiter = asyncio.get_running_loop().create_future()
        if priority:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        queued_at = time.perf_counter()
        try:
            if self._max_wait is None or priority:
                await waiter
            else:
                await asyncio.wait_for(asyncio.shield(waiter), self._max_wait)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                return self._observed(queued_at)  # granted at the very moment the bound passed: keep it
            self._remove(waiter)
            raise timed_out(self._name, self._max_wait, self.expected_wait()) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release()
            else:
                self._remove(waiter)
            raise
        self._observed(queued_at)

    def _observed(self, queued_at: float) -> None:
        QUEUE_WAIT.labels(self._name).observe(time.perf_counter() - queued_at)

    def _remove(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if not waiter.done():
            waiter.cancel()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over directly, keeping FIFO order
                return
        self._free += 1


def refusal(model: str, reason: str, message: str, wait: float) -> OverloadedError:
    """A refusal for load (429 with a Retry-After of `wait`, at least a second), counted in
    `ark_admission_rejected` under `reason`. The embeddings batcher refuses with the same errors."""
    ADMISSION_REJECTED.labels(model, reason).inc()
    return OverloadedError(message, retry_after=max(1, math.ceil(wait)))


def wait_too_long(model: str, expected: float, bound: float) -> OverloadedError:
    """The refusal on arrival of a request that would wait `expected` seconds, past `bound`."""
    return refusal(
        model,
        "wait_too_long",
        f"The server is busy: this request would wait about {expected:.0f} s for this model, longer than the "
        f"{bound:g} s allowed. Retry shortly.",
        expected - bound,
    )


def timed_out(model: str, bound: float, expected: float) -> OverloadedError:
    """The refusal of a request still waiting at `bound` (the estimate was wrong); retry after `expected`."""
    return refusal(
        model,
        "timed_out",
        f"The server is busy: this request waited {bound:g} s for this model without being served. Retry shortly.",
        expected,
    )
