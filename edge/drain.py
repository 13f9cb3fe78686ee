"""Graceful drain of the edge on SIGTERM.

uvicorn's own SIGTERM handling closes the listening socket at once: a new request would be refused at the TCP level
and a load balancer could not tell "draining" from "dead". The edge drains first instead:

1. readiness goes off (`/ready` answers 503), so Envoy and Kubernetes stop sending new work here;
2. new requests get 503 in OpenAI's envelope with `Retry-After` and `x-ark-draining: 1`, by which Envoy knows it may
   retry them on another edge (nothing was started);
3. requests in flight, long streams included, run on for up to `edge.drain_grace_seconds`;
4. past the grace, each remaining stream gets a last SSE event `data: {"error": ...}` and ends (its generation is
   cancelled, which aborts it on the worker); a request that has not answered yet gets the 503;
5. then uvicorn shuts down as usual. A second signal skips the drain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.errors import error_response
from edge.metrics import EDGE_DRAINING
from edge.middleware import PUBLIC_PATHS
from services.common.errors import UnavailableError

log = logging.getLogger(__name__)

DRAINING_HEADER = (b"x-ark-draining", b"1")


@dataclass(eq=False, slots=True)
class _InFlight:
    """One request being served, and how far its response got."""

    task: asyncio.Future[None]
    started: bool = False
    finished: bool = False
    event_stream: bool = False
    aborted: bool = False


def _shutting_down(retry_after: int) -> UnavailableError:
    return UnavailableError(
        "The server is shutting down and not accepting new requests. Retry shortly.",
        code="server_shutting_down",
        retry_after=retry_after,
    )


class Drain:
    """The edge's drain state, shared by the middleware (which tracks requests) and the server (which starts it)."""

    def __init__(self, grace_seconds: float, *, retry_after: int = 1) -> None:
        self.grace_seconds = grace_seconds
        self.retry_after = retry_after
        self.draining = False
        self._in_flight: set[_InFlight] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def begin(self) -> None:
        """Readiness off, new requests refused from now on."""
        self.draining = True
        EDGE_DRAINING.set(1)

    async def run(self) -> int:
        """Drain: wait for in-flight requests up to the grace, then end the rest; returns how many were ended."""
        self.begin()
        log.warning("draining: %d request(s) in flight, grace %.0f s", self.in_flight, self.grace_seconds)
        try:
            await asyncio.wait_for(self._idle.wait(), self.grace_seconds)
            return 0
        except TimeoutError:
            pass
        stragglers = list(self._in_flight)
        log.warning("drain grace over: ending %d request(s)", len(stragglers))
        for request in stragglers:
            request.aborted = True
            request.task.cancel()
        try:
            # Each one only has its last event to write.
            await asyncio.wait_for(self._idle.wait(), 5)
        except TimeoutError:
            log.error("%d request(s) did not end after being cancelled", self.in_flight)
        return len(stragglers)

    def _add(self, request: _InFlight) -> None:
        self._in_flight.add(request)
        self._idle.clear()

    def _remove(self, request: _InFlight) -> None:
        self._in_flight.discard(request)
        if not self._in_flight:
            self._idle.set()


class DrainMiddleware:
    """Tracks requests in flight; while draining, refuses new ones and answers `/ready` with 503."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.drain.draining and path not in PUBLIC_PATHS - {"/ready"}:
            response = error_response(_shutting_down(self.drain.retry_after))
            if path != "/ready":
                response.raw_headers.append(DRAINING_HEADER)
            await response(scope, receive, send)
            return
        if path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        await self._tracked(scope, receive, send)

    async def _tracked(self, scope: Scope, receive: Receive, send: Send) -> None:
        request: _InFlight

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.started = True
                content_type = next((v for k, v in message.get("headers", []) if k == b"content-type"), b"")
                request.event_stream = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                request.finished = True
            await send(message)

        # Its own task, so that the drain can cancel it without cancelling the server's task that writes to the
        # connection; cancelling the server's task (client gone, forced exit) still cancels this one.
        request = _InFlight(asyncio.ensure_future(self.app(scope, receive, tracking_send)))
        self.drain._add(request)
        try:
            await request.task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not request.aborted or (current is not None and current.cancelling()):
                raise
            await self._end(request, scope, receive, send)
        finally:
            self.drain._remove(request)

    async def _end(self, request: _InFlight, scope: Scope, receive: Receive, send: Send) -> None:
        """The last words of a request cut by the drain."""
        error = UnavailableError(
            "The server is shutting down: this response was cut after the drain grace period. Retry the request.",
            code="server_shutting_down",
            retry_after=self.drain.retry_after,
        )
        if not request.started:
            await error_response(error)(scope, receive, send)
        elif not request.finished:
            if request.event_stream:
                payload = json.dumps(error.to_dict(), separators=(",", ":")).encode()
                await send({"type": "http.response.body", "body": b"data: " + payload + b"\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM or SIGINT drains (see the module docstring) before shutting down."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is None and self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._start_draining)
            return
        super().handle_exit(sig, frame)

    def _start_draining(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain.run()
        finally:
            self.should_exit = True
