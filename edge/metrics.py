"""The edge's Prometheus metrics (served at its `/metrics`): its requests, chat as the edge sees it, the chat
workers' routing and failures, and session placement.

The request metrics come from a middleware, pure ASGI so that a stream is timed to its last byte and passes through
unbuffered. The route label is the matched route's template (`/v1/models/{model}`), never the raw path, so that the
number of series stays bounded.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.metrics import LATENCY_BUCKETS

# -- the edge (HTTP) ----------------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "ark_http_requests",
    "HTTP requests answered by the edge, by route template and status",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "ark_http_request_duration_seconds",
    "Time from a request's arrival to its last response byte (a stream's whole duration)",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("ark_http_requests_in_flight", "Requests the edge is working on (streams included)")
EDGE_DRAINING = Gauge("ark_edge_draining", "1 while the edge drains after SIGTERM, else 0")

# -- chat, as the edge sees it ------------------------------------------------------------------------------------

CHAT_TIME_TO_FIRST_TOKEN = Histogram(
    "ark_chat_time_to_first_token_seconds",
    "Time from starting a generation on a worker (queueing and prefill included) to its first token",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
CHAT_DECODE_RATE = Histogram(
    "ark_chat_decode_tokens_per_second",
    "Completion tokens per second after the first token, per request",
    ["model"],
    buckets=(1, 5, 10, 25, 50, 100, 150, 200, 300, 500, 1000, 2000, 5000),
)
CHAT_PROMPT_TOKENS = Counter("ark_chat_prompt_tokens", "Prompt tokens of chat requests", ["model"])
CHAT_CACHED_TOKENS = Counter(
    "ark_chat_cached_prompt_tokens", "Prompt tokens served from resident session state instead of computed", ["model"]
)
CHAT_COMPLETION_TOKENS = Counter("ark_chat_completion_tokens", "Tokens generated", ["model"])
CHAT_CACHED_RATIO = Histogram(
    "ark_chat_cached_token_ratio",
    "Per request, the share of prompt tokens reused from session state",
    ["model"],
    buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0),
)

# -- chat workers, as the edge sees them (failure detection and retries: edge/clients/chat_workers.py) -----------

CHAT_WORKER_UP = Gauge(
    "ark_chat_worker_routable", "1 while the edge routes new requests to this chat worker, else 0", ["worker"]
)
CHAT_WORKER_REQUESTS = Gauge(
    "ark_chat_worker_requests",
    "Requests running or queued on this chat worker as the edge estimates them at its last load report (every "
    "edge's; edge/clients/worker_load.py)",
    ["worker"],
)
CHAT_WORKER_EJECTIONS = Counter(
    "ark_chat_worker_ejections",
    "Times the edge stopped routing to a chat worker: probe_failed, call_failed, hung (its streams were ended)",
    ["worker", "reason"],
)
CHAT_RETRIES = Counter(
    "ark_chat_requests_retried", "Requests sent to another worker because theirs failed before admitting them"
)
CHAT_WORKER_FAILURES = Counter(
    "ark_chat_requests_worker_failed",
    "Requests whose worker died or hung while processing them (never retried; their fingerprint is quarantined)",
)
CHAT_QUARANTINED = Counter(
    "ark_chat_requests_quarantined", "Requests refused because the same request was being processed when a worker died"
)

# -- session placement (edge/sessions/placement.py) ---------------------------------------------------------------

STATELESS_FALLBACKS = Counter(
    "ark_session_stateless_fallbacks",
    "Chat requests served statelessly because the session registry (or its store) could not place them",
)

# -- chat streams, observed at the edge ---------------------------------------------------------------------------


class ChatStreamObserver:
    """Time to first token, decode rate and token counts of one generation, from the messages it streams.

    Fed with the worker's messages (`ark.chat.v1.StreamGenerateChatCompletionResponse`) as the edge reads them, so
    the figures are what a client sees, queueing included.
    """

    def __init__(self, model: str) -> None:
        self._model = model
        self._opened = time.perf_counter()
        self._first: float | None = None

    def observe(self, message: Any) -> None:
        kind = message.WhichOneof("event")
        if kind == "delta" and self._first is None and (message.delta.text or message.delta.token_ids):
            self._first = time.perf_counter()
            CHAT_TIME_TO_FIRST_TOKEN.labels(self._model).observe(self._first - self._opened)
        elif kind == "finished" and not getattr(message.finished, "more_choices", False):
            self._finished(message.finished.usage)

    def _finished(self, usage: Any) -> None:
        model = self._model
        CHAT_PROMPT_TOKENS.labels(model).inc(usage.prompt_tokens)
        CHAT_CACHED_TOKENS.labels(model).inc(usage.cached_tokens)
        CHAT_COMPLETION_TOKENS.labels(model).inc(usage.completion_tokens)
        if usage.prompt_tokens > 0:
            CHAT_CACHED_RATIO.labels(model).observe(usage.cached_tokens / usage.prompt_tokens)
        if self._first is not None and usage.completion_tokens > 1:
            elapsed = time.perf_counter() - self._first
            if elapsed > 0:
                CHAT_DECODE_RATE.labels(model).observe((usage.completion_tokens - 1) / elapsed)


# -- requests, by route ------------------------------------------------------------------------------------------

_METHODS = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"})


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app fails before answering, the server answers 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            HTTP_IN_FLIGHT.dec()
            # The router records the matched route in the scope; unmatched paths share one label.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            HTTP_REQUESTS.labels(route, method, str(status)).inc()
            HTTP_DURATION.labels(route, method).observe(time.perf_counter() - started)
