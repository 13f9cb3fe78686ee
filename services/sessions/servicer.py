"""gRPC glue for SessionRegistryService: protos in, Registry calls, protos out."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from ark.sessions.v1 import session_registry_service_pb2 as pb
from ark.sessions.v1 import session_registry_service_pb2_grpc as pb_grpc
from services.common.server import Service
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


class SessionRegistryServicer(pb_grpc.SessionRegistryServiceServicer):
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
