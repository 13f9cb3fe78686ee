"""Server interceptors: the one place where domain errors become gRPC status, and per-call metrics.

Both wrap every call of every service the same way, so the rewrapping of unary and streaming handlers lives once
(`GuardInterceptor`); each interceptor only says what happens around a call (`guard`).

Errors: servicers and engines raise `ArkError`; it becomes a status carrying `google.rpc.ErrorInfo`, and anything
else becomes INTERNAL with the details logged (never sent: they may hold internals).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common.errors import ArkError, InternalError
from services.common.grpc_errors import to_rpc_status

log = logging.getLogger(__name__)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Runs each unary or server-streaming call inside `guard(method, context)`, an async context manager."""

    def guard(self, method: str, context: grpc.aio.ServicerContext) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method, guard = handler_call_details.method, self.guard
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with guard(method, context):
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with guard(method, context):
                    async for response in inner_us(request, context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


class ErrorInterceptor(GuardInterceptor):
    @contextlib.asynccontextmanager
    async def guard(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        try:
            yield
        except Exception as exc:  # the point of this interceptor
            if not isinstance(exc, ArkError):
                log.exception("unhandled error in %s", method, exc_info=exc)
                exc = InternalError("The server had an error while processing your request.")
            await context.abort_with_status(to_rpc_status(exc))
