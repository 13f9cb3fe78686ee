"""The shared internal token on a real server on a free port: calls without it (or with another) are refused with
UNAUTHENTICATED, calls through `internal_channel` with it are served (unary and streaming), health checks answer
either way, and a server without a token serves everyone, as before."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ark.transcription.v1 import transcription_service_pb2 as pb
from ark.transcription.v1 import transcription_service_pb2_grpc as pb_grpc
from services.common.channels import CHANNEL_OPTIONS
from services.common.errors import InternalTokenError
from services.common.grpc_errors import from_rpc_error
from services.common.internal_auth import internal_channel
from services.common.server import Service, create_server, mark_serving

SERVICE = pb.DESCRIPTOR.services_by_name["TranscriptionService"].full_name
TOKEN = "t0ken-for-the-test-only-0123456789"


class EchoServicer(pb_grpc.TranscriptionServiceServicer):
    """Answers with the request id, once (unary) or in a stream of one `started` event."""

    async def Transcribe(self, request: pb.TranscribeRequest, context: grpc.aio.ServicerContext):
        return pb.TranscribeResponse(text=request.request_id)

    async def StreamTranscribe(self, request: pb.StreamTranscribeRequest, context: grpc.aio.ServicerContext):
        yield pb.StreamTranscribeResponse(started=pb.TranscriptionStarted(language=request.request_id))


async def start(token: str | None) -> tuple[grpc.aio.Server, str]:
    service = Service(SERVICE, EchoServicer(), pb_grpc.add_TranscriptionServiceServicer_to_server)
    server, port, health = create_server([service], "127.0.0.1:0", token=token)
    await server.start()
    await mark_serving(health, [SERVICE])
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def guarded_address() -> AsyncIterator[str]:
    server, address = await start(TOKEN)
    yield address
    await server.stop(0)


@pytest.mark.parametrize("token", [None, "another-token-of-the-right-length"])
async def test_calls_without_the_token_are_refused(guarded_address, token):
    async with internal_channel(guarded_address, CHANNEL_OPTIONS, token) as channel:
        stub = pb_grpc.TranscriptionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Transcribe(pb.TranscribeRequest(request_id="r1"))
        assert unary.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert isinstance(from_rpc_error(unary.value), InternalTokenError)
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await stub.StreamTranscribe(pb.StreamTranscribeRequest(request_id="r2")).read()
        assert streamed.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_calls_with_the_token_are_served(guarded_address):
    async with internal_channel(guarded_address, CHANNEL_OPTIONS, TOKEN) as channel:
        stub = pb_grpc.TranscriptionServiceStub(channel)
        assert (await stub.Transcribe(pb.TranscribeRequest(request_id="r1"))).text == "r1"
        first = await stub.StreamTranscribe(pb.StreamTranscribeRequest(request_id="r2")).read()
        assert first.started.language == "r2"


async def test_health_checks_need_no_token(guarded_address):
    async with grpc.aio.insecure_channel(guarded_address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_server_without_a_token_serves_everyone():
    server, address = await start(None)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await pb_grpc.TranscriptionServiceStub(channel).Transcribe(pb.TranscribeRequest(request_id="r"))
            assert reply.text == "r"
    finally:
        await server.stop(0)
