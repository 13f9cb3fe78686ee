"""The edge's client of the embeddings service.

Overload is refused at the edge, before the request's inputs are translated or sent, in two ways:

- while the service's last refusal for load holds (edge/saturation.py);
- when the inputs this edge has in the service for a model, with the new request's, exceed what the service holds
  for it (`max_queued_inputs` plus a batch in each encoder): the service would refuse it too. A flood of 24
  requests of 2,048 inputs each arrives before the first refusal comes back, and each one the edge translated and
  sent cost the requests behind it about 10 ms of the edge's CPU and the service's: on a loaded 2-core machine
  their refusals took 0.96 s at the median and 3.2 s at worst, then 0.16 s and 0.24 s (bench/embeddings_overload.py).
  With several edges each counts only its own; the service's admission bounds the sum.

What is left of a refusal's time in such a flood is CPU: the edge's own (about 25 ms for the whole flood, of which
parsing and validating the 24 bodies is about 3 ms, so admission is decided after the normal validation) and its
wait for a core while torch encodes the requests taken. The embeddings service therefore runs below the edge
(services/embeddings/priority.py): refusals p50 40 ms and p99 68 ms on a machine otherwise idle, 57 and 108 ms
while another stack's chat workers kept both cores busy, against 67 to 79 and 93 to 126 ms before under such load.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping

import grpc

from ark.embeddings.v1 import embeddings_service_pb2 as embeddings_pb
from ark.embeddings.v1 import embeddings_service_pb2_grpc as embeddings_grpc
from edge.saturation import Saturation
from services.common.admission import refusal
from services.common.channels import CHANNEL_OPTIONS
from services.common.grpc_errors import from_rpc_error
from services.common.internal_auth import internal_channel

_BUSY = "The server is busy embedding other requests. Retry shortly."


class EmbeddingsBackend:
    """The embeddings service: one address, which batches concurrent requests itself (see the module docstring)."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        overload_hold: float = 0.25,
        max_inputs: Mapping[str, int] | None = None,
    ) -> None:
        self._channel = internal_channel(address, CHANNEL_OPTIONS, token)
        self._stub = embeddings_grpc.EmbeddingsServiceStub(self._channel)
        self._saturation = Saturation("embeddings", max_hold=overload_hold)
        self._max_inputs = dict(max_inputs or {})  # per model: the inputs the service holds at most
        self._in_service: Counter[str] = Counter()  # per model: this edge's inputs in the service now

    def admit(self, model: str, inputs: int) -> None:
        """Refuse now (429) if a request of `inputs` inputs for `model` would be refused for load anyway."""
        if refusal_now := self._saturation.refusal(_BUSY):
            raise refusal_now
        bound = self._max_inputs.get(model)
        if bound is not None and self._in_service[model] and self._in_service[model] + inputs > bound:
            raise refusal("embeddings", "queue_full_at_edge", _BUSY, self._saturation.remaining)

    async def embed(self, request: embeddings_pb.EmbedRequest) -> embeddings_pb.EmbedResponse:
        self.admit(request.model, len(request.inputs))
        with self._holding(request.model, len(request.inputs)):
            try:
                return await self._stub.Embed(request)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                self._saturation.note(error)
                raise error from None

    @contextlib.contextmanager
    def _holding(self, model: str, inputs: int) -> Iterator[None]:
        self._in_service[model] += inputs
        try:
            yield
        finally:
            self._in_service[model] -= inputs

    async def close(self) -> None:
        await self._channel.close()
