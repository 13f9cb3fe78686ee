"""Per-method call counts, status codes, durations and in-flight calls for every ARK gRPC service (defined here:
only gRPC servers expose them).

Installed outside the error guard, so it sees the status a client gets (an `ArkError` has become its code by
then); a client that goes away mid-stream counts as CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.common.guards import CallGuard
from services.common.metrics import LATENCY_BUCKETS

GRPC_REQUESTS = Counter("ark_grpc_requests", "gRPC calls handled, by final status code", ["service", "method", "code"])
GRPC_DURATION = Histogram(
    "ark_grpc_request_duration_seconds",
    "Time a gRPC call took, streams to their end",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge("ark_grpc_requests_in_flight", "gRPC calls in progress", ["service", "method"])


def _split(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method


class _Call:
    """Bookkeeping for one call: in flight from creation, recorded once by `done()`."""

    def __init__(self, service: str, method: str) -> None:
        self._labels = (service, method)
        self._started = time.perf_counter()
        GRPC_IN_FLIGHT.labels(*self._labels).inc()

    def done(self, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        GRPC_IN_FLIGHT.labels(*self._labels).dec()
        GRPC_DURATION.labels(*self._labels).observe(time.perf_counter() - self._started)
        code = context.code()
        if code is None:
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
        GRPC_REQUESTS.labels(*self._labels, code.name).inc()


class MetricsGuard(CallGuard):
    @contextlib.asynccontextmanager
    async def guard(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        call, exc = _Call(*_split(method)), None
        try:
            yield
        except BaseException as error:
            exc = error
            raise
        finally:
            call.done(context, exc)
