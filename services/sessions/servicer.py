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


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _worker(record: WorkerRecord, placed: int) -> pb.Worker:
    return pb.Worker(
        name=record.name,
        address=record.address,
        models=list(record.models),
        session_capacity=record.session_capacity,
        placed_sessions=placed,
        lease_expire_time=_ts(record.lease_expires_at),
    )


class SessionRegistryServicer(pb_grpc.SessionRegistryServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def _session(self, record: SessionRecord) -> pb.Session:
        return pb.Session(
            id=record.id,
            api_key_hash=record.api_key_hash,
            model=record.model,
            worker_name=record.worker_name,
            worker_address=record.worker_address,
            create_time=_ts(record.created_at),
            last_use_time=_ts(record.last_used_at),
            expire_time=_ts(self._registry.expires_at(record)),
        )

    async def RenewWorkerLease(
        self,
        request: pb.RenewWorkerLeaseRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.RenewWorkerLeaseResponse:
        w = request.worker
        record, dropped = self._registry.renew_lease(
            w.name or w.address, w.address, tuple(w.models), w.session_capacity, request.lease_seconds or 10
        )
        placed = self._registry.placed_counts()[record.name]
        return pb.RenewWorkerLeaseResponse(worker=_worker(record, placed), dropped_session_ids=dropped)

    async def ListWorkers(
        self,
        request: pb.ListWorkersRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ListWorkersResponse:
        counts = self._registry.placed_counts()
        workers = self._registry.live_workers(request.model)
        return pb.ListWorkersResponse(workers=[_worker(w, counts[w.name]) for w in workers])

    async def CreateSession(
        self,
        request: pb.CreateSessionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.Session:
        return self._session(await self._registry.create(request.api_key_hash, request.model))

    async def GetSession(
        self,
        request: pb.GetSessionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.Session:
        return self._session(self._registry.get(request.id, request.api_key_hash))

    async def ReplaceSession(
        self,
        request: pb.ReplaceSessionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.Session:
        record = await self._registry.replace(request.id, request.api_key_hash, request.failed_worker_name)
        return self._session(record)

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
