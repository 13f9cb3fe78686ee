"""ARK's Prometheus metrics, all defined here so that names and labels agree across processes.

The edge serves them at `/metrics` on its own port; each gRPC service serves them at `http://<host>:<port>/metrics`
on its metrics port (`metrics_port` in the configuration, passed by the launcher as `ARK_METRICS_PORT`; containers
set that variable directly). Ratios (cached tokens, error rates) are left to PromQL over the counters, except where a
per-request distribution says more than the average (the cached-token ratio histogram).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily

METRICS_PORT_ENV = "ARK_METRICS_PORT"

# Seconds: from a fast JSON reply to a multi-minute generation.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

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
    buckets=_LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("ark_http_requests_in_flight", "Requests the edge is working on (streams included)")
EDGE_DRAINING = Gauge("ark_edge_draining", "1 while the edge drains after SIGTERM, else 0")

# -- chat, as the edge sees it ------------------------------------------------------------------------------------

CHAT_TIME_TO_FIRST_TOKEN = Histogram(
    "ark_chat_time_to_first_token_seconds",
    "Time from starting a generation on a worker (queueing and prefill included) to its first token",
    ["model"],
    buckets=_LATENCY_BUCKETS,
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

# -- every gRPC service -------------------------------------------------------------------------------------------

GRPC_REQUESTS = Counter("ark_grpc_requests", "gRPC calls handled, by final status code", ["service", "method", "code"])
GRPC_DURATION = Histogram(
    "ark_grpc_request_duration_seconds",
    "Time a gRPC call took, streams to their end",
    ["service", "method"],
    buckets=_LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge("ark_grpc_requests_in_flight", "gRPC calls in progress", ["service", "method"])

# -- admission to engine slots (chat workers, transcription) -------------------------------------------------------

QUEUE_WAIT = Histogram(
    "ark_queue_wait_seconds",
    "Time an admitted request waited for an engine slot",
    ["model"],
    buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
)
ADMISSION_REJECTED = Counter(
    "ark_admission_rejected",
    "Requests refused before queueing for an engine slot: queue_full, wait_too_long (the expected wait exceeds the "
    "bound), timed_out (waited past the bound), shutting_down",
    ["model", "reason"],
)

# -- embeddings ---------------------------------------------------------------------------------------------------

EMBEDDINGS_BATCH_SIZE = Histogram(
    "ark_embeddings_batch_size",
    "Inputs per encoder forward pass (concurrent requests share passes)",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


def observe_batch_sizes(model: str, encode: Callable[[Sequence[Any]], Any]) -> Callable[[Sequence[Any]], Any]:
    """`encode`, recording the size of every batch it is given."""
    histogram = EMBEDDINGS_BATCH_SIZE.labels(model)

    def observed(batch: Sequence[Any]) -> Any:
        histogram.observe(len(batch))
        return encode(batch)

    return observed


# -- chat workers: engine load, read when scraped -----------------------------------------------------------------


class _EngineStatus(Protocol):
    session_capacity: int
    resident_sessions: int
    queued_requests: int


class _Engine(Protocol):
    def status(self) -> _EngineStatus: ...


class _ChatEngineCollector:
    """Queue depth and resident sessions per model, read from the engines at scrape time.

    Scrapes run on the metrics server's thread; `status()` only reads counters, which is safe from another thread.
    """

    def __init__(self, engines: Mapping[str, _Engine]) -> None:
        self._engines = engines

    def collect(self) -> Iterable[GaugeMetricFamily]:
        queued = GaugeMetricFamily(
            "ark_chat_queue_depth", "Requests waiting for a slot on this worker", labels=["model"]
        )
        resident = GaugeMetricFamily(
            "ark_chat_resident_sessions", "Sessions whose state is resident on this worker", labels=["model"]
        )
        capacity = GaugeMetricFamily(
            "ark_chat_session_capacity", "Sessions this worker can keep resident", labels=["model"]
        )
        for model, engine in self._engines.items():
            status = engine.status()
            queued.add_metric([model], status.queued_requests)
            resident.add_metric([model], status.resident_sessions)
            capacity.add_metric([model], status.session_capacity)
        return [queued, resident, capacity]


def register_chat_engines(engines: Mapping[str, _Engine]) -> None:
    """Expose the engines' queue depth, resident sessions and capacity."""
    REGISTRY.register(_ChatEngineCollector(engines))


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


# -- serving the metrics of a gRPC service ------------------------------------------------------------------------


def port_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """The metrics port a process was given through `ARK_METRICS_PORT` (unset or empty: none)."""
    value = (os.environ if env is None else env).get(METRICS_PORT_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{METRICS_PORT_ENV}={value!r} is not a port number")
    return int(value)


class MetricsServer:
    """Prometheus' HTTP exposition on its own thread; `close()` frees the port."""

    def __init__(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host)
        self.port = port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
