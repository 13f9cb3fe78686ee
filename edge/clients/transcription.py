"""The edge's client of the transcription service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from ark.transcription.v1 import transcription_service_pb2 as transcription_pb
from ark.transcription.v1 import transcription_service_pb2_grpc as transcription_grpc
from edge.saturation import Saturation
from services.common.channels import CHANNEL_OPTIONS
from services.common.errors import ArkError, UnavailableError
from services.common.grpc_errors import from_rpc_error
from services.common.internal_auth import internal_channel


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
