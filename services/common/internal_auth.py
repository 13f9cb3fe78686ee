"""The shared token between ARK's own processes: the client side (every internal gRPC channel sends it).

ARK's gRPC services trust whoever reaches them: a caller can generate on a chat worker, read any session's
placement from the registry, or end it. They must stay on a private network (docs/operations.md). The token is a
second line of defence for networks that are not private enough: with `services.internal_token` set, every call
from the edge, the registry and the chat workers carries it in the `x-ark-internal-token` metadata, and every
service refuses a call without it (`TokenGuard` in services/common/guards.py), health checks excepted, so that
probes keep working. `ark up` generates one per run; in containers it comes from a secret.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

METADATA_KEY = "x-ark-internal-token"


def _with_token(details: grpc.aio.ClientCallDetails, pair: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), pair)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryWithToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._pair = (METADATA_KEY, token)

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(_with_token(details, self._pair), request)


class _StreamWithToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._pair = (METADATA_KEY, token)

    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(_with_token(details, self._pair), request)


def internal_channel(address: str, options: Sequence[tuple[str, Any]], token: str | None) -> grpc.aio.Channel:
    """A channel to one of ARK's services; with a token, every call on it carries the token."""
    # One interceptor per call kind (a channel files each under one kind only); ARK's protos use only these two.
    interceptors = [_UnaryWithToken(token), _StreamWithToken(token)] if token else None
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata to send on a call made outside `internal_channel` (a synchronous probe, a test)."""
    return ((METADATA_KEY, token),) if token else ()
