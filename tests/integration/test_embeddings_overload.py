"""A flood of embeddings requests against the real service (MiniLM, real gRPC, in-process): the edge refuses what
the service could not hold before translating or sending it, the service refuses what is admitted beyond its queue
before tokenizing it, and what was taken is served in full."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client import REGISTRY

from ark.embeddings.v1 import embeddings_service_pb2 as pb
from edge.app import create_app
from edge.clients.embeddings import EmbeddingsBackend
from edge.http_limits import bounded_protocol
from services.common.config import ArkConfig, Capability, load_config
from services.common.errors import OverloadedError
from services.common.server import create_server, mark_serving
from services.embeddings.embedder import Embedder
from services.embeddings.engines import create_engine
from services.embeddings.servicer import embeddings_service
from services.embeddings.settings import SentenceTransformersSettings, max_inputs_in_service
from tests.support.stack import free_port

pytestmark = pytest.mark.integration

INPUTS = 32  # per request
QUEUE = 64  # the service's queue: two such requests


def _rejected(model: str, reason: str) -> float:
    return REGISTRY.get_sample_value("ark_admission_rejected_total", {"model": model, "reason": reason}) or 0.0


def _request(model: str, i: int) -> pb.EmbedRequest:
    inputs = [pb.EmbeddingInput(text=f"Request {i}, sentence {j}: the ferry left at dawn.") for j in range(INPUTS)]
    return pb.EmbedRequest(request_id=f"req_{i}", model=model, inputs=inputs)


async def test_a_flood_is_refused_at_the_edge_before_it_is_sent_and_what_was_taken_is_served():
    config = load_config(env={})
    model = config.models_for(Capability.EMBEDDINGS)[0]
    model = model.model_copy(update={"settings": {**model.settings, "max_queued_inputs": QUEUE, "max_batch_size": 8}})
    settings = SentenceTransformersSettings.of(model)
    embedder = Embedder(create_engine(model, settings), settings, config.limits)
    service = embeddings_service({model.id: embedder})
    server, port, health = create_server([service], "127.0.0.1:0")
    await server.start()
    await mark_serving(health, [service.name])
    bound = max_inputs_in_service(model)
    assert bound == QUEUE + 8  # its queue and one batch in its one encoder
    edge = EmbeddingsBackend(f"127.0.0.1:{port}", max_inputs={model.id: bound})
    try:
        at_edge, at_service = _rejected("embeddings", "queue_full_at_edge"), _rejected(model.id, "queue_full")
        flood = [asyncio.ensure_future(edge.embed(_request(model.id, i))) for i in range(8)]
        outcomes = await asyncio.gather(*flood, return_exceptions=True)
        served = [o for o in outcomes if isinstance(o, pb.EmbedResponse)]
        refused = [o for o in outcomes if isinstance(o, OverloadedError)]
        assert len(served) + len(refused) == len(flood), outcomes
        # 72 inputs fit in the service: the first two requests went; the other six never left the edge.
        assert len(served) == 2 and len(refused) == 6
        assert all(r.retry_after >= 1 for r in refused)
        assert _rejected("embeddings", "queue_full_at_edge") == at_edge + 6
        assert _rejected(model.id, "queue_full") == at_service
        for response in served:
            vectors = np.stack([np.frombuffer(e.float32_le, dtype="<f4") for e in response.embeddings])
            assert vectors.shape == (INPUTS, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
        # Served, their inputs left the service: the edge sends again.
        assert len((await edge.embed(_request(model.id, 99))).embeddings) == INPUTS
    finally:
        await edge.close()
        await server.stop(None)
        await embedder.close()


KEY = "sk-embeddings-overload"


def _serve_edge(config: ArkConfig) -> tuple[uvicorn.Server, threading.Thread]:
    """The edge app behind real HTTP (uvicorn, as `python -m edge` serves it), in a thread of its own."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host="127.0.0.1",
            port=config.edge.port,
            http=bounded_protocol(config.limits),
            loop="asyncio",
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


async def test_a_refusal_over_http_is_openais_429_with_retry_after_and_a_request_id():
    """While a request holds the service's room, the next one that would not fit is refused by the edge with
    OpenAI's envelope, 429, Retry-After and x-request-id, before its inputs are checked; the one held is served."""
    base = load_config(env={})
    model = base.models_for(Capability.EMBEDDINGS)[0]
    model = model.model_copy(update={"settings": {**model.settings, "max_queued_inputs": QUEUE, "max_batch_size": 8}})
    settings = SentenceTransformersSettings.of(model)
    engine = create_engine(model, settings)
    release = threading.Event()
    encode = engine.encode

    def held_encode(batch):  # the real model, once the test lets it start
        release.wait(60)
        return encode(batch)

    engine.encode = held_encode  # type: ignore[method-assign]
    embedder = Embedder(engine, settings, base.limits)
    service = embeddings_service({model.id: embedder})
    server, port, health = create_server([service], "127.0.0.1:0")
    await server.start()
    await mark_serving(health, [service.name])
    edge_port = free_port()
    config = load_config(
        env={
            "ARK_API_KEY": KEY,
            "ARK__EDGE__PORT": str(edge_port),
            "ARK__SESSIONS__ENABLED": "false",
            "ARK__SERVICES__EMBEDDINGS__ADDRESS": f"127.0.0.1:{port}",
        }
    )
    config = config.model_copy(update={"models": [model if m.id == model.id else m for m in config.models]})
    edge, thread = _serve_edge(config)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{edge_port}/v1", api_key=KEY, max_retries=0)
    try:
        while not edge.started:  # noqa: ASYNC110 - polls uvicorn, which runs in its own thread
            await asyncio.sleep(0.05)
        held = asyncio.ensure_future(client.embeddings.create(model=model.id, input=["the ferry left at dawn"] * 64))
        while embedder._batcher.queued == 0:  # noqa: ASYNC110 - the held request is in the service
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.embeddings.create(model=model.id, input=["one sentence too many"] * INPUTS)
        # Refused before its inputs were checked: an empty string among them changes nothing.
        with pytest.raises(openai.RateLimitError):
            await client.embeddings.create(model=model.id, input=[""] * INPUTS)
        release.set()
        assert len((await held).data) == 64
    finally:
        release.set()
        await client.close()
        edge.should_exit = True
        await asyncio.to_thread(thread.join, 10)
        await server.stop(None)
        await embedder.close()
    response = refused.value.response
    assert response.status_code == 429
    assert response.json() == {
        "error": {
            "message": "The server is busy embedding other requests. Retry shortly.",
            "type": "rate_limit_error",
            "param": None,
            "code": "overloaded",
        }
    }
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-request-id"].startswith("req_")
