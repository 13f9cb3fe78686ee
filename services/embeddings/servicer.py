"""gRPC glue for EmbeddingsService: protos in, domain calls, protos out. No logic of its own."""

from __future__ import annotations

import grpc

from ark.embeddings.v1 import embeddings_service_pb2 as pb
from ark.embeddings.v1 import embeddings_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidRequestError, ModelNotFoundError
from services.common.server import Service
from services.embeddings.domain import EmbeddingInput, EmbeddingRequest, EmbeddingResult
from services.embeddings.embedder import Embedder

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingsService"].full_name


def request_from_proto(req: pb.EmbedRequest) -> EmbeddingRequest:
    inputs: list[EmbeddingInput] = []
    for i, item in enumerate(req.inputs):
        kind = item.WhichOneof("kind")
        if kind == "text":
            inputs.append(item.text)
        elif kind == "token_ids":
            inputs.append(tuple(item.token_ids.ids))
        else:
            raise InvalidRequestError(f"inputs[{i}] is neither text nor token ids", param=f"input[{i}]")
    return EmbeddingRequest(
        request_id=req.request_id,
        model=req.model,
        inputs=tuple(inputs),
        dimensions=req.dimensions if req.HasField("dimensions") else None,
    )


def result_to_proto(result: EmbeddingResult) -> pb.EmbedResponse:
    vectors = result.vectors.astype("<f4", copy=False)
    return pb.EmbedResponse(
        embeddings=[pb.Embedding(index=i, float32_le=row.tobytes()) for i, row in enumerate(vectors)],
        prompt_tokens=result.prompt_tokens,
    )


class EmbeddingsServicer(pb_grpc.EmbeddingsServiceServicer):
    def __init__(self, embedders: dict[str, Embedder]) -> None:
        self._embedders = embedders

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        embedder = self._embedders.get(request.model)
        if embedder is None:
            raise ModelNotFoundError(request.model)
        # A client disconnect cancels this task, which drops the request's inputs still queued for the encoder.
        return result_to_proto(await embedder.embed(request_from_proto(request)))


def embeddings_service(embedders: dict[str, Embedder]) -> Service:
    return Service(SERVICE_NAME, EmbeddingsServicer(embedders), pb_grpc.add_EmbeddingsServiceServicer_to_server)
