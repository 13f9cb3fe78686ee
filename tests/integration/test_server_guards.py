"""The guards every ARK gRPC server wraps around its methods, on a real server on a free port: domain errors become
their status, anything else INTERNAL without internals, a status a method set itself passes untouched, and every
call is counted."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from ark.embeddings.v1 import embeddings_service_pb2 as pb
from ark.embeddings.v1 import embeddings_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidRequestError
from services.common.grpc_errors import from_rpc_error
from services.common.server import Service, create_server, mark_serving

SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingsService"].full_name


class FailingServicer(pb_grpc.EmbeddingsServiceServicer):
    """Fails as the request's model asks: a domain error, or a bug."""

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        if request.model == "invalid":
            raise InvalidRequestError("bad input", param="input")
        raise RuntimeError("secret internal detail")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    service = Service(SERVICE, FailingServicer(), pb_grpc.add_EmbeddingsServiceServicer_to_server)
    server, port, health = create_server([service], "127.0.0.1:0")
    await server.start()
    await mark_serving(health, [SERVICE])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(0)


def _count(service: str, method: str, code: str) -> float:
    labels = {"service": service, "method": method, "code": code}
    return REGISTRY.get_sample_value("ark_grpc_requests_total", labels) or 0.0


async def test_a_domain_error_keeps_its_class_and_param(channel):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.EmbeddingsServiceStub(channel).Embed(pb.EmbedRequest(model="invalid"))
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidRequestError) and error.param == "input"


async def test_a_bug_becomes_internal_without_its_details_and_is_counted(channel):
    before = _count(SERVICE, "Embed", "INTERNAL")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pb_grpc.EmbeddingsServiceStub(channel).Embed(pb.EmbedRequest(model="other"))
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")
    assert _count(SERVICE, "Embed", "INTERNAL") == before + 1


async def test_health_probes_keep_their_own_status_and_are_counted(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    before = _count("grpc.health.v1.Health", "Check", "OK")
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert _count("grpc.health.v1.Health", "Check", "OK") == before + 1
