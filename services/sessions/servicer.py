"""gRPC glue for SessionRegistryService: protos in, Registry calls, protos out."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from ark.sessions.v1 import session_registry_service_pb2 as pb
from ark.sessions.v1 import session_registry_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidRequestError, NotFoundError
from services.common.server import Service
from services.sessions.objects import StoredItem, StoredObject
from services.sessions.registry import Registry
from services.sessions.store import SessionRecord, WorkerRecord

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SessionRegistryService"].full_name

# A worker that does not say how long a lease it wants gets this many seconds.
DEFAULT_LEASE_SECONDS = 10


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _worker(record: WorkerRecord) -> pb.Worker:
    return pb.Worker(
        name=record.name,
        address=record.address,
        models=list(record.models),
        session_capacity=record.session_capacity,
        placed_sessions=record.placed,
        lease_expire_time=_ts(record.lease_expires_at),
        epoch=record.epoch,
    )


def _session(record: SessionRecord) -> pb.Session:
    return pb.Session(
        id=record.id,
        api_key_hash=record.api_key_hash,
        model=record.model,
        worker_name=record.worker_name,
        worker_address=record.worker_address,
        create_time=_ts(record.created_at),
        last_use_time=_ts(record.last_used_at),
        expire_time=_ts(record.expires_at),
    )


KINDS = {
    pb.STORED_OBJECT_KIND_RESPONSE: "response",
    pb.STORED_OBJECT_KIND_CONVERSATION: "conversation",
    pb.STORED_OBJECT_KIND_RESPONSE_EVENTS: "response_events",
}


def _kind(kind: int) -> str:
    if kind not in KINDS:
        raise InvalidRequestError("A stored object's kind must be set.", param="kind")
    return KINDS[kind]


def _object_not_found(kind: int, object_id: str) -> NotFoundError:
    # The same answer for unknown, expired and foreign ids: nothing about other keys' objects leaks.
    return NotFoundError(f"No {KINDS.get(kind, 'object')} found with id '{object_id}'.", code="not_found")


def _stored(kind: int, record: StoredObject | None, object_id: str) -> pb.StoredObject:
    if record is None:
        raise _object_not_found(kind, object_id)
    return pb.StoredObject(
        kind=kind,
        id=record.id,
        payload_json=record.payload,
        session_id=record.session_id,
        create_time=_ts(record.created_at),
        expire_time=_ts(record.expires_at),
        etag=record.etag,
    )


def _items(items) -> list[StoredItem]:
    return [StoredItem(i.id, i.payload_json) for i in items]


class StoredObjectsServicer:
    """The stored-object RPCs, mixed into the registry's servicer: thin, each one store call."""

    _registry: Registry

    async def CreateStoredObject(self, request: pb.CreateStoredObjectRequest, context) -> pb.CreateStoredObjectResponse:
        o = request.object
        record = await self._registry.objects.create(
            request.api_key_hash, _kind(o.kind), o.id, o.payload_json, o.session_id, _items(request.items)
        )
        return pb.CreateStoredObjectResponse(object=_stored(o.kind, record, o.id))

    async def GetStoredObject(self, request: pb.GetStoredObjectRequest, context) -> pb.GetStoredObjectResponse:
        record = await self._registry.objects.get(request.api_key_hash, _kind(request.kind), request.id)
        return pb.GetStoredObjectResponse(object=_stored(request.kind, record, request.id))

    async def UpdateStoredObject(self, request: pb.UpdateStoredObjectRequest, context) -> pb.UpdateStoredObjectResponse:
        record = await self._registry.objects.update(
            request.api_key_hash,
            _kind(request.kind),
            request.id,
            request.payload_json,
            request.session_id,
            request.etag,
        )
        return pb.UpdateStoredObjectResponse(object=_stored(request.kind, record, request.id))

    async def DeleteStoredObject(self, request: pb.DeleteStoredObjectRequest, context) -> pb.DeleteStoredObjectResponse:
        record = await self._registry.delete_object(request.api_key_hash, _kind(request.kind), request.id)
        _stored(request.kind, record, request.id)
        return pb.DeleteStoredObjectResponse()

    async def AppendStoredItems(self, request: pb.AppendStoredItemsRequest, context) -> pb.AppendStoredItemsResponse:
        kind = _kind(request.kind)
        if not await self._registry.objects.append_items(request.api_key_hash, kind, request.id, _items(request.items)):
            raise _object_not_found(request.kind, request.id)
        return pb.AppendStoredItemsResponse()

    async def ListStoredItems(self, request: pb.ListStoredItemsRequest, context) -> pb.ListStoredItemsResponse:
        found = await self._registry.objects.list_items(
            request.api_key_hash,
            _kind(request.kind),
            request.id,
            after=request.after,
            limit=request.limit,
            descending=request.descending,
        )
        if found is None:
            raise _object_not_found(request.kind, request.id)
        items, more = found
        return pb.ListStoredItemsResponse(
            items=[pb.StoredItem(id=i.id, payload_json=i.payload) for i in items], has_more=more
        )

    async def GetStoredItem(self, request: pb.GetStoredItemRequest, context) -> pb.GetStoredItemResponse:
        item = await self._registry.objects.get_item(
            request.api_key_hash, _kind(request.kind), request.id, request.item_id
        )
        if item is None:
            raise NotFoundError(f"No item found with id '{request.item_id}'.", code="not_found")
        return pb.GetStoredItemResponse(item=pb.StoredItem(id=item.id, payload_json=item.payload))

    async def DeleteStoredItem(self, request: pb.DeleteStoredItemRequest, context) -> pb.DeleteStoredItemResponse:
        kind = _kind(request.kind)
        if not await self._registry.objects.delete_item(request.api_key_hash, kind, request.id, request.item_id):
            raise NotFoundError(f"No item found with id '{request.item_id}'.", code="not_found")
        return pb.DeleteStoredItemResponse()


class SessionRegistryServicer(StoredObjectsServicer, pb_grpc.SessionRegistryServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def RenewWorkerLease(
        self,
        request: pb.RenewWorkerLeaseRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.RenewWorkerLeaseResponse:
        w = request.worker
        record, dropped = await self._registry.renew_lease(
            w.name or w.address,
            w.address,
            tuple(w.models),
            w.session_capacity,
            w.incarnation,
            request.lease_seconds or DEFAULT_LEASE_SECONDS,
        )
        return pb.RenewWorkerLeaseResponse(worker=_worker(record), dropped_session_ids=dropped)

    async def ListWorkers(
        self,
        request: pb.ListWorkersRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ListWorkersResponse:
        return pb.ListWorkersResponse(workers=[_worker(w) for w in await self._registry.live_workers(request.model)])

    async def PlaceConversation(
        self,
        request: pb.PlaceConversationRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.PlaceConversationResponse:
        placement = await self._registry.place(
            request.api_key_hash,
            request.model,
            request.session_id,
            request.conversation_key,
            failed_worker=request.failed_worker_name,
            soonest=tuple(request.soonest_worker_addresses),
        )
        return pb.PlaceConversationResponse(
            session=_session(placement.session),
            session_created=placement.session_is_new,
            worker=_worker(placement.worker),
            placed=placement.placed_now,
        )

    async def GetSession(
        self,
        request: pb.GetSessionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.Session:
        return _session(await self._registry.get(request.id, request.api_key_hash))

    async def DeleteSession(
        self,
        request: pb.DeleteSessionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.DeleteSessionResponse:
        await self._registry.delete(request.id, request.api_key_hash)
        return pb.DeleteSessionResponse()


def registry_service(registry: Registry) -> Service:
    return Service(
        SERVICE_NAME, SessionRegistryServicer(registry), pb_grpc.add_SessionRegistryServiceServicer_to_server
    )
