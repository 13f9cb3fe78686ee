"""Graceful stop of a gRPC service: calls in flight get a grace period, then a status that says why they ended.

On SIGTERM (`services.common.server.serve`): health turns NOT_SERVING, so the edge routes new work elsewhere; work
still waiting in a queue is refused with UNAVAILABLE (it was never started, so the edge sends it to another worker);
calls in flight run on for the grace period; the ones still running then end with UNAVAILABLE and
`code: server_shutting_down` — a stream gets one error event at the edge rather than a transport failure, and is
not mistaken for a crash (which the edge would quarantine as a possible poison pill). A watchdog bounds the whole
stop: the process exits at grace + `EXIT_MARGIN_SECONDS` whatever is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator

import grpc

from services.common.errors import UnavailableError
from services.common.guards import CallGuard

log = logging.getLogger(__name__)

# After the grace: time to end the remaining calls, close the engines and exit before the watchdog forces it.
EXIT_MARGIN_SECONDS = 10.0


class ShutdownGuard(CallGuard):
    """Knows the calls in flight, so that a stopping server can wait for them and then end the rest with a status.

    Innermost guard: the UnavailableError it raises for a call it ended becomes the call's status in ErrorGuard.
    """

    def __init__(self) -> None:
        self._calls: set[asyncio.Task] = set()
        self._ended: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    @contextlib.asynccontextmanager
    async def guard(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        self._idle.clear()
        try:
            yield
        except asyncio.CancelledError:
            if task not in self._ended:
                raise  # the client went away
            task.uncancel()
            raise UnavailableError(
                "The server is shutting down: this call was ended after the grace period. Retry the request.",
                code="server_shutting_down",
            ) from None
        finally:
            self._calls.discard(task)
            self._ended.discard(task)
            if not self._calls:
                self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """Wait up to `seconds` for every call to end; True if they did."""
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def end_all(self) -> int:
        """End every call in flight (each gets UNAVAILABLE, server_shutting_down); returns how many."""
        for task in self._calls:
            self._ended.add(task)
            task.cancel()
        return len(self._calls)


def exit_after(seconds: float) -> threading.Timer:
    """Start a watchdog that ends the process after `seconds`, however stuck a thread or the event loop is."""

    def force() -> None:
        log.error("still running %.0f s after the stop signal: exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()
    return timer
