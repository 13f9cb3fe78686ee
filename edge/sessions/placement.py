"""Which worker serves a chat request, and under which session: the edge's half of the session contract.

- Sessions disabled: every request is stateless and no cookie is ever set.
- A valid cookie of this API key for this model resumes the session on its worker.
- Anything else (no cookie, malformed, unknown, expired, another key's, another model's) starts a new session;
  all those cases look the same to the client: a fresh server-generated id in a new cookie.
- The registry unreachable: the request is served statelessly, without a cookie.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from ark.sessions.v1 import session_registry_service_pb2 as sessions_pb
from edge.backends import SessionRegistryClient
from edge.sessions.cookies import parse_session_id
from services.common.config import SessionsConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Placement:
    session_id: str
    worker_name: str
    worker_address: str
    is_new: bool


class SessionPlacer:
    def __init__(self, registry: SessionRegistryClient | None, policy: SessionsConfig) -> None:
        self._registry = registry if policy.enabled else None
        self.policy = policy

    @property
    def enabled(self) -> bool:
        return self._registry is not None

    async def place(self, cookie: str | None, api_key_hash: str, model: str) -> Placement | None:
        """A placement for the request, or None to serve it statelessly."""
        if self._registry is None:
            return None
        session_id = parse_session_id(cookie)
        try:
            if session_id is not None:
                try:
                    session = await self._registry.get(session_id, api_key_hash)
                    if session.model == model:
                        return _placement(session, is_new=False)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
            return _placement(await self._registry.create(api_key_hash, model), is_new=True)
        except grpc.RpcError as exc:
            log.warning("session registry unavailable (%s): serving statelessly", exc.code().name)
            return None

    async def replace(self, placement: Placement, api_key_hash: str) -> Placement | None:
        """The pinned worker is gone: a new session elsewhere (new id, new cookie), or None for stateless."""
        assert self._registry is not None
        try:
            session = await self._registry.replace(placement.session_id, api_key_hash, placement.worker_name)
        except grpc.RpcError as exc:
            log.warning("could not re-place session (%s): serving statelessly", exc.code().name)
            return None
        return _placement(session, is_new=True)

    async def lookup(self, cookie: str | None, api_key_hash: str) -> sessions_pb.Session | None:
        """The caller's current session, or None (disabled, no cookie, unknown, expired, foreign)."""
        session_id = parse_session_id(cookie)
        if self._registry is None or session_id is None:
            return None
        try:
            return await self._registry.get(session_id, api_key_hash)
        except grpc.RpcError:
            return None

    async def end(self, session_id: str, api_key_hash: str) -> None:
        assert self._registry is not None
        await self._registry.delete(session_id, api_key_hash)


def _placement(session: sessions_pb.Session, *, is_new: bool) -> Placement:
    return Placement(session.id, session.worker_name, session.worker_address, is_new)
