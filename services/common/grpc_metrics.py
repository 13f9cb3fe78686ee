"""Per-method call counts, status codes, durations and in-flight calls for every ARK gRPC service.

Installed outside the error interceptor, so it sees the status a client gets (an `ArkError` has become its code by
then); a client that goes away mid-stream counts as CANCELLED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common.metrics import GRPC_DURATION, GRPC_IN_FLIGHT, GRPC_REQUESTS


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


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split(handler_call_details.method)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call, exc = _Call(service, method), None
                try:
                    return await inner_uu(request, context)
                except BaseException as error:
                    exc = error
                    raise
                finally:
                    call.done(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call, exc = _Call(service, method), None
                try:
                    async for response in inner_us(request, context):
                        yield response
                except BaseException as error:
                    exc = error
                    raise
                finally:
                    call.done(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
