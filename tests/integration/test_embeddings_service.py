"""EmbeddingsService over real gRPC, on the real MiniLM model, in-process on a free port: vectors, token-id input,
errors as rich status, and batching of concurrent calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ark.embeddings.v1 import embeddings_service_pb2 as pb
from ark.embeddings.v1 import embeddings_service_pb2_grpc as pb_grpc
from services.common.config import Capability, load_config, resolve_model_path
from services.common.errors import InvalidRequestError, ModelNotFoundError, UnsupportedParameterError
from services.common.grpc_errors import from_rpc_error
from services.common.server import create_server, mark_serving
from services.embeddings.embedder import Embedder
from services.embeddings.engines import create_engine
from services.embeddings.servicer import embeddings_service
from services.embeddings.settings import SentenceTransformersSettings

pytestmark = pytest.mark.integration


@dataclass
class EmbeddingsServer:
    stub: pb_grpc.EmbeddingsServiceStub
    channel: grpc.aio.Channel
    model_id: str
    model_path: str
    batch_sizes: list[int]


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[EmbeddingsServer]:
    model = load_config(env={}).models_for(Capability.EMBEDDINGS)[0]
    settings = SentenceTransformersSettings.of(model)
    engine = create_engine(model, settings)
    batch_sizes: list[int] = []
    encode = engine.encode

    def counting_encode(batch: Sequence[Sequence[int]]) -> np.ndarray:
        batch_sizes.append(len(batch))
        return encode(batch)

    engine.encode = counting_encode  # observe the batches the real engine is given
    embedder = Embedder(engine, settings, load_config(env={}).limits)
    service = embeddings_service({model.id: embedder})
    grpc_server, port, health = create_server([service], "127.0.0.1:0")
    await grpc_server.start()
    await mark_serving(health, [service.name])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield EmbeddingsServer(pb_grpc.EmbeddingsServiceStub(channel), channel, model.id, model.path, batch_sizes)
    await channel.close()
    await grpc_server.stop(None)
    await embedder.close()


def raw_tokenizer(server: EmbeddingsServer):
    """The model's tokenizer.json as a client would load it, minus the truncation and padding stored in it."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(resolve_model_path(server.model_path) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def texts(*values: str) -> list[pb.EmbeddingInput]:
    return [pb.EmbeddingInput(text=v) for v in values]


def vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.stack([np.frombuffer(e.float32_le, dtype="<f4") for e in response.embeddings])


async def embed(server: EmbeddingsServer, inputs: list[pb.EmbeddingInput], **kw) -> pb.EmbedResponse:
    return await server.stub.Embed(pb.EmbedRequest(request_id="t", model=server.model_id, inputs=inputs, **kw))


async def error_of(call) -> Exception:
    with pytest.raises(grpc.RpcError) as info:
        await call
    return from_rpc_error(info.value)


async def test_health_and_reflection(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="ark.embeddings.v1.EmbeddingsService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "ark.embeddings.v1.EmbeddingsService" in names


async def test_vectors_are_minilm_unit_vectors_identical_to_sentence_transformers(server):
    from sentence_transformers import SentenceTransformer

    sentences = ["A man is playing a guitar.", "The new movie is awesome.", "Stocks fell sharply on Monday."]
    response = await embed(server, texts(*sentences))
    got = vectors(response)
    assert [e.index for e in response.embeddings] == [0, 1, 2]
    assert got.shape == (3, 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    reference = SentenceTransformer(str(resolve_model_path(server.model_path)), device="cpu").encode(sentences)
    assert np.allclose(got, reference, atol=1e-5)


async def test_prompt_tokens_count_what_the_model_read(server):
    tokenizer = raw_tokenizer(server)
    sentences = ["Hello world", "Embeddings turn text into vectors of numbers."]
    response = await embed(server, texts(*sentences))
    assert response.prompt_tokens == sum(len(tokenizer.encode(s).ids) for s in sentences)  # [CLS] … [SEP] included


async def test_token_ids_embed_like_the_text_they_encode(server):
    tokenizer = raw_tokenizer(server)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    by_text = await embed(server, texts(text))
    by_ids = await embed(server, [pb.EmbeddingInput(token_ids=pb.TokenIds(ids=ids))])
    assert np.allclose(vectors(by_text), vectors(by_ids), atol=1e-5)
    assert by_text.prompt_tokens == by_ids.prompt_tokens == len(ids) + 2


async def test_concurrent_calls_are_encoded_in_shared_batches(server):
    before = len(server.batch_sizes)
    sentences = [f"Sentence number {i} for the batching test." for i in range(24)]
    responses = await asyncio.gather(*(embed(server, texts(s)) for s in sentences))
    alone = vectors(await embed(server, texts(sentences[5])))
    batches = server.batch_sizes[before:-1]
    assert sum(batches) == 24
    assert len(batches) < 24 and max(batches) > 1
    assert np.allclose(vectors(responses[5]), alone, atol=1e-5)  # batching does not change a vector


async def test_an_over_long_input_is_refused_with_the_limit(server):
    err = await error_of(embed(server, texts("short", "word " * 300)))
    assert isinstance(err, InvalidRequestError)
    assert err.param == "input[1]" and err.code == "context_length_exceeded"
    assert "256 tokens" in err.message


async def test_token_ids_outside_the_vocabulary_are_refused(server):
    err = await error_of(embed(server, [pb.EmbeddingInput(token_ids=pb.TokenIds(ids=[101, 30522]))]))
    assert isinstance(err, InvalidRequestError) and err.code == "invalid_value" and "30521" in err.message


async def test_dimensions_are_unsupported_for_minilm(server):
    err = await error_of(embed(server, texts("hi"), dimensions=128))
    assert isinstance(err, UnsupportedParameterError) and err.param == "dimensions"
    assert vectors(await embed(server, texts("hi"), dimensions=384)).shape == (1, 384)


async def test_unknown_model_is_not_found(server):
    err = await error_of(server.stub.Embed(pb.EmbedRequest(model="nope", inputs=texts("hi"))))
    assert isinstance(err, ModelNotFoundError) and err.http_status == 404
