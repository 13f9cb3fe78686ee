"""The registry's calls to chat workers: telling one to drop a session's state."""

from __future__ import annotations

import grpc

from ark.chat.v1 import chat_service_pb2 as chat_pb
from ark.chat.v1 import chat_service_pb2_grpc as chat_grpc
from services.common.channels import CHANNEL_OPTIONS
from services.common.internal_auth import internal_channel


class WorkerClients:
    """One channel per worker address, opened on first use."""

    def __init__(self, timeout: float = 2.0, *, token: str | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._timeout = timeout
        self._token = token

    async def drop_state(self, address: str, session_id: str) -> bool:
        """True when the worker acknowledged; False when it could not be reached (it will learn at renewal)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = internal_channel(address, CHANNEL_OPTIONS, self._token)
        stub = chat_grpc.ChatServiceStub(channel)
        try:
            await stub.DeleteSessionState(
                chat_pb.DeleteSessionStateRequest(session_id=session_id), timeout=self._timeout
            )
        except grpc.RpcError:
            return False
        return True

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
