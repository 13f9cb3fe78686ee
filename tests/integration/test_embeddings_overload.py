"""A flood of embeddings requests against the real service (MiniLM, real gRPC, in-process): the edge refuses what
the service could not hold before translating or sending it, the service refuses what is admitted beyond its queue
before tokenizing it, and what was taken is served in full."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import REGISTRY

from ark.embeddings.v1 import embeddings_service_pb2 as pb
from edge.clients.embeddings import EmbeddingsBackend
from services.common.config import Capability, load_config
from services.common.errors import OverloadedError
from services.common.server import create_server, mark_serving
from services.embeddings.embedder import Embedder
from services.embeddings.engines import create_engine
from services.embeddings.servicer import embeddings_service
from services.embeddings.settings import SentenceTransformersSettings, max_inputs_in_service

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
