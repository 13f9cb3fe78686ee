"""ChatService over real gRPC, on the real model: stream shape, errors as rich status, cancellation, queueing."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ark.chat.v1 import chat_service_pb2 as pb
from services.common.errors import InvalidRequestError, ModelNotFoundError, OverloadedError
from services.common.grpc_errors import from_rpc_error
from tests.integration.conftest import start_chat_server

pytestmark = pytest.mark.integration


def request(server, text: str, *, max_tokens: int = 16, **sampling) -> pb.StreamGenerateChatCompletionRequest:
    return pb.StreamGenerateChatCompletionRequest(
        request_id="test",
        model=server.model_id,
        messages=[
            pb.ChatMessage(role=pb.ROLE_SYSTEM, content="You are a helpful assistant."),
            pb.ChatMessage(role=pb.ROLE_USER, content=text),
        ],
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
    )


async def collect(call) -> list[pb.StreamGenerateChatCompletionResponse]:
    """Read to the end with read() (grpc.aio forbids mixing read() with iteration on one call)."""
    out = []
    while (message := await call.read()) is not grpc.aio.EOF:
        out.append(message)
    return out


async def test_health_and_reflection(chat_server):
    health = health_pb2_grpc.HealthStub(chat_server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="ark.chat.v1.ChatService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(chat_server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "ark.chat.v1.ChatService" in names


async def test_stream_starts_then_deltas_then_finishes_with_usage(chat_server):
    messages = await collect(
        chat_server.stub.StreamGenerateChatCompletion(request(chat_server, "What is the capital of France?"))
    )
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[:2] == ["admitted", "started"] and kinds[-1] == "finished" and set(kinds[2:-1]) == {"delta"}
    text = "".join(m.delta.text for m in messages[2:-1])
    assert "Paris" in text
    finished = messages[-1].finished
    assert finished.finish_reason == pb.FINISH_REASON_STOP
    assert finished.usage.prompt_tokens == messages[1].started.prompt_tokens > 10
    assert finished.usage.completion_tokens == sum(len(m.delta.token_ids) for m in messages[2:-1])


async def test_max_tokens_ends_with_length(chat_server):
    messages = await collect(
        chat_server.stub.StreamGenerateChatCompletion(request(chat_server, "Count to fifty.", max_tokens=5))
    )
    assert messages[-1].finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert messages[-1].finished.usage.completion_tokens == 5


async def test_errors_travel_as_rich_status(chat_server):
    bad = request(chat_server, "x")
    del bad.messages[:]
    with pytest.raises(grpc.RpcError) as info:
        await collect(chat_server.stub.StreamGenerateChatCompletion(bad))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(info.value)
    assert isinstance(err, InvalidRequestError) and err.param == "messages"

    unknown = request(chat_server, "x")
    unknown.model = "no-such-model"
    with pytest.raises(grpc.RpcError) as info:
        await collect(chat_server.stub.StreamGenerateChatCompletion(unknown))
    assert isinstance(from_rpc_error(info.value), ModelNotFoundError)

    too_long = request(chat_server, "word " * 9000)
    with pytest.raises(grpc.RpcError) as info:
        await collect(chat_server.stub.StreamGenerateChatCompletion(too_long))
    err = from_rpc_error(info.value)
    assert err.code == "context_length_exceeded" and "8192" in err.message


async def test_cancel_aborts_generation_at_once(chat_server):
    call = chat_server.stub.StreamGenerateChatCompletion(
        request(chat_server, "Write a very long story.", max_tokens=3000)
    )
    for _ in range(4):
        await call.read()
    call.cancel()
    # The slot is free again within a token or two: a new request starts at once instead of queueing
    # behind ~3000 tokens.
    started = time.perf_counter()
    follow = chat_server.stub.StreamGenerateChatCompletion(request(chat_server, "Say hi.", max_tokens=2))
    first = await follow.read()
    assert first.WhichOneof("event") == "admitted"
    await collect(follow)
    assert time.perf_counter() - started < 15


async def test_concurrent_requests_queue_without_interleaving(chat_server):
    prompt = "Name three colours."
    alone = await collect(chat_server.stub.StreamGenerateChatCompletion(request(chat_server, prompt, max_tokens=20)))
    expected = "".join(m.delta.text for m in alone if m.HasField("delta"))
    calls = [
        chat_server.stub.StreamGenerateChatCompletion(request(chat_server, prompt, max_tokens=20)) for _ in range(3)
    ]
    results = await asyncio.gather(*(collect(c) for c in calls))
    for messages in results:
        assert "".join(m.delta.text for m in messages if m.HasField("delta")) == expected


async def test_full_queue_is_refused_with_resource_exhausted():
    server, info = await start_chat_server(max_queue=1, sequences=1)
    try:
        running = info.stub.StreamGenerateChatCompletion(request(info, "Write a long story.", max_tokens=400))
        await running.read()
        queued = info.stub.StreamGenerateChatCompletion(request(info, "Hi", max_tokens=2))
        queued_task = asyncio.create_task(collect(queued))
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.RpcError) as excinfo:
            await collect(info.stub.StreamGenerateChatCompletion(request(info, "Hi", max_tokens=2)))
        assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(from_rpc_error(excinfo.value), OverloadedError)
        running.cancel()
        assert (await queued_task)[-1].HasField("finished")
    finally:
        await info.channel.close()
        await server.stop(None)
