"""gRPC channels from the edge to the services, opened in the app's lifespan (they belong to its event loop)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import grpc

from ark.chat.v1 import chat_service_pb2 as chat_pb
from ark.chat.v1 import chat_service_pb2_grpc as chat_grpc
from services.common.errors import UnavailableError
from services.common.grpc_errors import from_rpc_error
from services.common.server import CHANNEL_OPTIONS


class ChatStream:
    """A started generation: its `started` event, then the remaining messages (read with `read()`, because
    grpc.aio forbids mixing `read()` and iteration on one call)."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, started: chat_pb.GenerationStarted) -> None:
        self._call = call
        self.started = started

    async def __aiter__(self) -> AsyncIterator[chat_pb.StreamGenerateChatCompletionResponse]:
        while (message := await self._call.read()) is not grpc.aio.EOF:
            yield message

    def cancel(self) -> None:
        self._call.cancel()


class ChatWorkers:
    """The chat workers, tried round-robin; a worker that is down is skipped before any byte reaches the client."""

    def __init__(self, addresses: list[str]) -> None:
        self._channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
        self._stubs = [chat_grpc.ChatServiceStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))

    async def open_stream(self, request: chat_pb.StreamGenerateChatCompletionRequest) -> ChatStream:
        """Start a generation and wait for its `started` event, so errors surface before the HTTP response."""
        start = next(self._next)
        last: grpc.RpcError | None = None
        for i in range(len(self._stubs)):
            call = self._stubs[(start + i) % len(self._stubs)].StreamGenerateChatCompletion(request)
            try:
                first = await call.read()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    last = exc
                    continue
                raise from_rpc_error(exc) from None
            if first is grpc.aio.EOF or first.WhichOneof("event") != "started":
                call.cancel()
                raise UnavailableError("The chat worker closed the stream before starting.")
            return ChatStream(call, first.started)
        raise from_rpc_error(last) if last else UnavailableError("No chat worker is configured.")

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
