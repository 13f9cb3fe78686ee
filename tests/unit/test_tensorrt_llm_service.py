"""A GPU chat worker over real gRPC: the ChatService, the generation layer and the TensorRT-LLM engine, with the
stub of the recorded 1.2.1 API below (no GPU): what the edge would receive, errors as rich status included."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ark.chat.v1 import chat_service_pb2 as pb
from ark.chat.v1 import chat_service_pb2_grpc as chat_grpc
from services.chat.engines import create_engine
from services.chat.generator import Generator
from services.chat.servicer import chat_service
from services.common.config import ModelConfig
from services.common.errors import InvalidRequestError, UnsupportedParameterError
from services.common.grpc_errors import from_rpc_error
from services.common.server import create_server, mark_serving
from tests.unit.test_tensorrt_llm_engine import checkpoint, fake  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration


@pytest.fixture
async def stub(fake, checkpoint):  # noqa: F811 - fixtures
    model = ModelConfig(
        id="gpu-model", capability="chat", engine="tensorrt_llm", path=str(checkpoint), settings={"max_seq_len": 256}
    )
    service = chat_service({model.id: Generator(create_engine(model), max_queue=4)})
    server, port, health = create_server([service], "127.0.0.1:0")
    await server.start()
    await mark_serving(health, [service.name])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield chat_grpc.ChatServiceStub(channel)
    await channel.close()
    await server.stop(None)


def _request(text: str = "Tell me a story.", *, key: str = "", **sampling) -> pb.StreamGenerateChatCompletionRequest:
    sampling.setdefault("max_tokens", 6)
    return pb.StreamGenerateChatCompletionRequest(
        request_id="r",
        model="gpu-model",
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)],
        sampling=pb.SamplingParams(**sampling),
        session=pb.SessionBinding(api_key_hash=key) if key else None,
    )


async def _collect(call) -> list[pb.StreamGenerateChatCompletionResponse]:
    out = []
    while (message := await call.read()) is not grpc.aio.EOF:
        out.append(message)
    return out


async def test_a_stream_reports_reused_tokens_and_n_choices(stub, fake):  # noqa: F811 - fixtures
    first = await _collect(stub.StreamGenerateChatCompletion(_request(key="k", temperature=0.7, n=2)))
    kinds = [m.WhichOneof("event") for m in first]
    assert kinds[:2] == ["admitted", "started"] and kinds[-1] == "finished"
    finished = [m.finished for m in first if m.HasField("finished")]
    assert sorted(f.choice_index for f in finished) == [0, 1]
    assert {m.delta.choice_index for m in first if m.HasField("delta")} == {0, 1}
    again = await _collect(stub.StreamGenerateChatCompletion(_request(key="k", temperature=0.7, n=2)))
    started = again[1].started
    assert started.cached_tokens == started.prompt_tokens - 1 > 0
    assert again[-1].finished.usage.cached_tokens == started.cached_tokens


@pytest.mark.parametrize(
    ("sampling", "error", "param"),
    [
        ({"temperature": 0.0, "n": 2}, InvalidRequestError, "n"),
        ({"seed": 3}, UnsupportedParameterError, "seed"),
        ({"presence_penalty": 1.0}, UnsupportedParameterError, "presence_penalty"),
    ],
)
async def test_what_the_engine_cannot_honour_is_a_rich_status_before_any_token(stub, fake, sampling, error, param):  # noqa: F811
    with pytest.raises(grpc.RpcError) as refused:
        await _collect(stub.StreamGenerateChatCompletion(_request(**sampling)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(refused.value)
    assert isinstance(err, error) and err.param == param
    assert not [c for c in fake.calls if c[0] == "generate_async"], "nothing reached TensorRT-LLM"


async def test_a_cancelled_call_aborts_the_tensorrt_llm_request(stub, fake):  # noqa: F811 - fixtures
    fake.step_delay = 0.01
    call = stub.StreamGenerateChatCompletion(_request(temperature=0.0, max_tokens=200))
    while (await call.read()).WhichOneof("event") != "delta":
        pass
    call.cancel()
    for _ in range(500):
        if ("abort", 1) in fake.calls:
            break
        await asyncio.sleep(0.01)  # waits for the condition, bounded
    assert ("abort", 1) in fake.calls
