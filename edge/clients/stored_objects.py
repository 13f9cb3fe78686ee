"""The edge's client for stored responses and conversations, kept by the session registry (its stored-object RPCs).

Unlike placement, which falls back to stateless serving, a stored object is the request's subject: when the registry
cannot be reached the request fails (503, retryable). gRPC stays inside this module: every `grpc.RpcError` becomes
ARK's own error here, so the serving code above handles ArkError only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

from ark.sessions.v1 import session_registry_service_pb2 as pb
from ark.sessions.v1 import session_registry_service_pb2_grpc as pb_grpc
from edge.clients.registry import REGISTRY_SERVICE_CONFIG
from services.common.channels import CHANNEL_OPTIONS
from services.common.grpc_errors import from_rpc_error
from services.common.internal_auth import internal_channel

RESPONSE = pb.STORED_OBJECT_KIND_RESPONSE
CONVERSATION = pb.STORED_OBJECT_KIND_CONVERSATION
RESPONSE_EVENTS = pb.STORED_OBJECT_KIND_RESPONSE_EVENTS

# A stored object is read or written on the request path; the registry answers from memory or one store round trip.
TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored object as the edge reads it."""

    id: str
    record: dict[str, Any]
    session_id: str
    created_at: int
    # The version read: an update given it applies only if nobody wrote the object since (else ConflictError).
    etag: str = ""


def _stored(o: pb.StoredObject) -> Stored:
    return Stored(o.id, json.loads(o.payload_json or "{}"), o.session_id, o.create_time.seconds, o.etag)


def _items(items: list[tuple[str, dict[str, Any]]]) -> list[pb.StoredItem]:
    return [pb.StoredItem(id=i, payload_json=json.dumps(p, separators=(",", ":"))) for i, p in items]


class StoredObjects:
    def __init__(self, address: str, *, token: str | None = None) -> None:
        options = [*CHANNEL_OPTIONS, ("grpc.service_config", REGISTRY_SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        self._channel = internal_channel(address, options, token)
        self._stub = pb_grpc.SessionRegistryServiceStub(self._channel)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def create(
        self,
        owner: str,
        kind: int,
        object_id: str,
        record: dict[str, Any],
        *,
        session_id: str = "",
        items: list[tuple[str, dict[str, Any]]] = (),  # type: ignore[assignment]
    ) -> Stored:
        obj = pb.StoredObject(kind=kind, id=object_id, payload_json=json.dumps(record), session_id=session_id)
        request = pb.CreateStoredObjectRequest(api_key_hash=owner, object=obj, items=_items(list(items)))
        return _stored((await self._call(self._stub.CreateStoredObject, request)).object)

    async def get(self, owner: str, kind: int, object_id: str) -> Stored:
        request = pb.GetStoredObjectRequest(api_key_hash=owner, kind=kind, id=object_id)
        return _stored((await self._call(self._stub.GetStoredObject, request)).object)

    async def update(
        self, owner: str, kind: int, object_id: str, record: dict[str, Any], *, session_id: str = "", etag: str = ""
    ) -> Stored:
        """Replace the record; with `etag` (a `Stored.etag`), only if the object is still that version, else
        ConflictError."""
        request = pb.UpdateStoredObjectRequest(
            api_key_hash=owner,
            kind=kind,
            id=object_id,
            payload_json=json.dumps(record),
            session_id=session_id,
            etag=etag,
        )
        return _stored((await self._call(self._stub.UpdateStoredObject, request)).object)

    async def delete(self, owner: str, kind: int, object_id: str) -> None:
        await self._call(
            self._stub.DeleteStoredObject, pb.DeleteStoredObjectRequest(api_key_hash=owner, kind=kind, id=object_id)
        )

    async def append_items(
        self, owner: str, kind: int, object_id: str, items: list[tuple[str, dict[str, Any]]]
    ) -> None:
        request = pb.AppendStoredItemsRequest(api_key_hash=owner, kind=kind, id=object_id, items=_items(items))
        await self._call(self._stub.AppendStoredItems, request)

    async def list_items(
        self, owner: str, kind: int, object_id: str, *, after: str = "", limit: int = 0, descending: bool = False
    ) -> tuple[list[dict[str, Any]], bool]:
        request = pb.ListStoredItemsRequest(
            api_key_hash=owner, kind=kind, id=object_id, after=after, limit=limit, descending=descending
        )
        reply = await self._call(self._stub.ListStoredItems, request)
        return [json.loads(i.payload_json) for i in reply.items], reply.has_more

    async def get_item(self, owner: str, kind: int, object_id: str, item_id: str) -> dict[str, Any]:
        request = pb.GetStoredItemRequest(api_key_hash=owner, kind=kind, id=object_id, item_id=item_id)
        return json.loads((await self._call(self._stub.GetStoredItem, request)).item.payload_json)

    async def delete_item(self, owner: str, kind: int, object_id: str, item_id: str) -> None:
        request = pb.DeleteStoredItemRequest(api_key_hash=owner, kind=kind, id=object_id, item_id=item_id)
        await self._call(self._stub.DeleteStoredItem, request)

    async def close(self) -> None:
        await self._channel.close()
