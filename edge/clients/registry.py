"""The edge's client of the session registry (placement, session lookup and end)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

from ark.sessions.v1 import session_registry_service_pb2 as sessions_pb
from ark.sessions.v1 import session_registry_service_pb2_grpc as sessions_grpc
from services.common.channels import CHANNEL_OPTIONS
from services.common.grpc_errors import from_rpc_error
from services.common.internal_auth import internal_channel

# Registries are stateless over a shared store, so any of them may answer. A target naming several (`dns:///registry`
# resolving to each replica, or `ipv4:10.0.0.1:50050,10.0.0.2:50050`) is balanced round robin (CHANNEL_OPTIONS), and a
# call that found a registry gone (killed, restarting) is retried on another at once instead of being served
# statelessly.
REGISTRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "ark.sessions.v1.SessionRegistryService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.05s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


class SessionRegistryClient:
    """The edge's view of the session registry. Every call is bounded by a short timeout: session infrastructure
    failing must never fail a request (the caller serves it statelessly). Calls raise ArkError only (a registry
    outage is UnavailableError)."""

    def __init__(self, address: str, timeout: float, *, token: str | None = None) -> None:
        options = [*CHANNEL_OPTIONS, ("grpc.service_config", REGISTRY_SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        self._channel = internal_channel(address, options, token)
        self._stub = sessions_grpc.SessionRegistryServiceStub(self._channel)
        self._timeout = timeout

    async def place(
        self,
        api_key_hash: str,
        model: str,
        session_id: str,
        conversation_key: str,
        *,
        failed_worker: str = "",
        soonest: Sequence[str] = (),
    ) -> sessions_pb.PlaceConversationResponse:
        request = sessions_pb.PlaceConversationRequest(
            api_key_hash=api_key_hash,
            model=model,
            session_id=session_id,
            conversation_key=conversation_key,
            failed_worker_name=failed_worker,
            soonest_worker_addresses=soonest,
        )
        try:
            return await self._stub.PlaceConversation(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def get(self, session_id: str, api_key_hash: str) -> sessions_pb.Session:
        request = sessions_pb.GetSessionRequest(id=session_id, api_key_hash=api_key_hash)
        try:
            return await self._stub.GetSession(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def delete(self, session_id: str, api_key_hash: str) -> None:
        request = sessions_pb.DeleteSessionRequest(id=session_id, api_key_hash=api_key_hash)
        try:
            await self._stub.DeleteSession(request, timeout=self._timeout * 4)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def close(self) -> None:
        await self._channel.close()
