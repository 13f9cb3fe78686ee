"""A chat worker's lease with the session registry: register, renew, and drop what the registry says to drop.

Renewing every third of the lease means two missed renewals still leave the worker placed; a worker that dies
stops renewing, and the registry stops placing sessions on it within one lease.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc

from ark.sessions.v1 import session_registry_service_pb2 as pb
from ark.sessions.v1 import session_registry_service_pb2_grpc as pb_grpc
from services.chat.generator import Generator
from services.common.channels import CHANNEL_OPTIONS
from services.common.internal_auth import internal_channel

log = logging.getLogger(__name__)

# This process's identity for the registry: a restart is a new incarnation, so the registry bumps the worker's epoch
# and stops trusting placements made on the previous process (whose state died with it).
INCARNATION = uuid.uuid4().hex


async def keep_lease(
    registry_address: str,
    address: str,
    generators: dict[str, Generator],
    lease_seconds: float,
    *,
    token: str | None = None,
) -> None:
    """Run until cancelled; failures are logged and retried (the worker serves statelessly meanwhile)."""
    async with internal_channel(registry_address, CHANNEL_OPTIONS, token) as channel:
        stub = pb_grpc.SessionRegistryServiceStub(channel)
        registered = False
        while True:
            for generator in generators.values():
                await generator.expire_idle()
            statuses = [g.status() for g in generators.values()]
            worker = pb.Worker(
                name=address,
                address=address,
                models=list(generators),
                session_capacity=sum(s.session_capacity for s in statuses),
                incarnation=INCARNATION,
            )
            try:
                reply = await stub.RenewWorkerLease(
                    pb.RenewWorkerLeaseRequest(worker=worker, lease_seconds=int(max(1, lease_seconds))),
                    timeout=lease_seconds / 3,
                )
                if not registered:
                    log.info("registered with the session registry at %s", registry_address)
                    registered = True
                for session_id in reply.dropped_session_ids:
                    for generator in generators.values():
                        await generator.drop_session(session_id)
            except grpc.RpcError as exc:
                if registered:
                    log.warning("session registry unreachable (%s); retrying", exc.code().name)
                registered = False
            await asyncio.sleep(lease_seconds / 3)
