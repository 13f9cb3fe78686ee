"""The edge's client of the embeddings service."""

from __future__ import annotations

import grpc

from ark.embeddings.v1 import embeddings_service_pb2 as embeddings_pb
from ark.embeddings.v1 import embeddings_service_pb2_grpc as embeddings_grpc
from edge.saturation import Saturation
from services.common.channels import CHANNEL_OPTIONS
from services.common.grpc_errors import from_rpc_error
from services.common.internal_auth import internal_channel


class EmbeddingsBackend:
    """The embeddings service: one address, which batches concurrent requests itself.

    While its last refusal for load holds (edge/saturation.py), the edge refuses new requests itself."""

    def __init__(self, address: str, *, token: str | None = None, overload_hold: float = 0.25) -> None:
        self._channel = internal_channel(address, CHANNEL_OPTIONS, token)
        self._stub = embeddings_grpc.EmbeddingsServiceStub(self._channel)
        self._saturation = Saturation("embeddings", max_hold=overload_hold)

    async def embed(self, request: embeddings_pb.EmbedRequest) -> embeddings_pb.EmbedResponse:
        if refusal := self._saturation.refusal("The server is busy embedding other requests. Retry shortly."):
            raise refusal
        try:
            return await self._stub.Embed(request)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            self._saturation.note(error)
            raise error from None

    async def close(self) -> None:
        await self._channel.close()
