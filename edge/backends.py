"""gRPC channels from the edge to the services, opened in the app's lifespan (they belong to its event loop).

The chat workers, with their failure detection and retry rules, are in edge/clients/chat_workers.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc

from ark.embeddings.v1 import embeddings_service_pb2 as embeddings_pb
from ark.embeddings.v1 import embeddings_service_pb2_grpc as embeddings_grpc
from ark.sessions.v1 import session_registry_service_pb2 as sessions_pb
from ark.sessions.v1 import session_registry_service_pb2_grpc as sessions_grpc
from ark.transcription.v1 import transcription_service_pb2 as transcription_pb
from ark.transcription.v1 import transcription_service_pb2_grpc as transcription_grpc
from edge.saturation import Saturation
from services.common.errors import ArkError, UnavailableError
from services.common.grpc_errors import from_rpc_error
from services.common.internal_auth import internal_channel
from services.common.server import CHANNEL_OPTIONS

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
        self, api_key_hash: str, model: str, session_id: str, conversation_key: str, *, failed_worker: str = ""
    ) -> sessions_pb.PlaceConversationResponse:
        request = sessions_pb.PlaceConversationRequest(
            api_key_hash=api_key_hash,
            model=model,
            session_id=session_id,
            conversation_key=conversation_key,
            failed_worker_name=failed_worker,
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


class EmbeddingsBackend:
    """The embeddings service: one address, which batches concurrent requests itself.

    While its last refusal for load holds (edge/saturation.py), the edge refuses new requests itself."""

    def __init__(self, address: str, *, token: str | None = None, overload_hold: float = 0.25) -> None:
        self._channel = internal_channel(address, CHANNEL_OPTIONS, token)
        self._stub = embeddings_grpc.EmbeddingsServiceStub(self._channel)
        self._saturation = Saturation("embeddings", max_hold=overload_hold)

    async def embed(self, request: embeddings_pb.EmbedRequest) -> embeddings_pb.EmbedResponse:
        if refusal := self._saturation.refusal("The server is busy embedding other requests. Retry shortly."):
            raise refusal
        try:
            return await self._stub.Embed(request)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            self._saturation.note(error)
            raise error from None

    async def close(self) -> None:
        await self._channel.close()


class TranscriptionStream:
    """A started transcription: its `started` event, then segments and `finished`. Iterating raises ArkError only."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, started: transcription_pb.TranscriptionStarted) -> None:
        self._call = call
        self.started = started

    async def __aiter__(self) -> AsyncIterator[transcription_pb.StreamTranscribeResponse]:
        while True:
            try:
                message = await self._call.read()
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            if message is grpc.aio.EOF:
                return
            yield message

    def cancel(self) -> None:
        self._call.cancel()


class TranscriptionBackend:
    """The transcription service: one address; uploads travel in one message (CHANNEL_OPTIONS lifts gRPC's 4 MiB).

    When the service refuses a request for load, it says for how long (Retry-After); until then the edge refuses
    new uploads itself, from the headers (`refuse_if_saturated`), instead of reading and forwarding up to 25 MB only
    to hear the same answer.
    """

    def __init__(self, address: str, *, token: str | None = None) -> None:
        self._channel = internal_channel(address, CHANNEL_OPTIONS, token)
        self._stub = transcription_grpc.TranscriptionServiceStub(self._channel)
        self._saturation = Saturation("transcription")

    def refuse_if_saturated(self) -> None:
        """Raise OverloadedError while the service's last refusal for load still holds."""
        if refusal := self._saturation.refusal("The server is busy transcribing other requests. Retry shortly."):
            raise refusal

    def _error(self, exc: grpc.RpcError) -> ArkError:
        error = from_rpc_error(exc)
        self._saturation.note(error)
        return error

    async def transcribe(self, request: transcription_pb.TranscribeRequest) -> transcription_pb.TranscribeResponse:
        try:
            return await self._stub.Transcribe(request)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    async def open_stream(self, request: transcription_pb.StreamTranscribeRequest) -> TranscriptionStream:
        """Start transcribing and wait for `started`, so that a bad file is an HTTP error, not a broken stream."""
        call = self._stub.StreamTranscribe(request)
        try:
            first = await call.read()
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        if first is grpc.aio.EOF or first.WhichOneof("event") != "started":
            call.cancel()
            raise UnavailableError("The transcription service closed the stream before starting.")
        return TranscriptionStream(call, first.started)

    async def close(self) -> None:
        await self._channel.close()
