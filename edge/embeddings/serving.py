"""Serving logic for embeddings: resolve the model, apply the parameter policy, call the service, render the list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ark.embeddings.v1 import embeddings_service_pb2 as pb
from edge.catalog import Catalog
from edge.clients.embeddings import EmbeddingsBackend
from edge.compat import EMBEDDINGS, apply_policy
from edge.embeddings import openai_tokens, translate
from edge.embeddings.schemas import EmbeddingRequest
from services.common.config import Capability, LimitsConfig


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated request, ready to run."""

    model: str
    request: pb.EmbedRequest
    encoding_format: str
    ignored_params: list[str]


class Embeddings:
    def __init__(self, catalog: Catalog, backend: EmbeddingsBackend, limits: LimitsConfig) -> None:
        self._catalog = catalog
        self._backend = backend
        self._limits = limits
        # OpenAI's encodings load at start (about 0.3 s each), not in the event loop on the first request using them.
        for entry in catalog.entries():
            if entry.model.capability is Capability.EMBEDDINGS:
                openai_tokens.encoding_for(entry.name)

    def admit(self, body: EmbeddingRequest) -> None:
        """Refuse at once (429), before its inputs are checked and translated, a request the service could not
        hold now (edge/clients/embeddings.py)."""
        model = self._catalog.resolve(body.model, Capability.EMBEDDINGS)
        self._backend.admit(model.id, translate.input_count(body.input))

    def prepare(self, body: EmbeddingRequest, *, request_id: str) -> Prepared:
        model = self._catalog.resolve(body.model, Capability.EMBEDDINGS)
        ignored = apply_policy(EMBEDDINGS, body)
        request = translate.request_to_proto(
            body,
            model_id=model.id,
            request_id=request_id,
            limits=self._limits,
            encoding=openai_tokens.encoding_for(body.model),
        )
        return Prepared(model.id, request, body.encoding_format or "float", ignored)

    async def create(self, job: Prepared) -> dict[str, Any]:
        """Embed and return a CreateEmbeddingResponse."""
        response = await self._backend.embed(job.request)
        return translate.response_to_json(response, model=job.model, encoding_format=job.encoding_format)
