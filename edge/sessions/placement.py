"""Which worker serves a chat request, and under which session: the edge's half of the session contract.

- Sessions disabled: no registry call, no cookie, any worker.
- Otherwise one registry call per request (`PlaceConversation`) returns the session and the worker for the request's
  conversation (edge/sessions/conversation.py). A valid cookie of this API key resumes its session; anything else
  (no cookie, malformed, unknown, expired, another key's) gets a fresh session, and all those cases look the same to
  the client: a fresh server-generated id in a new cookie. A request without a cookie is still placed by content.
- The registry unreachable (or its store down): the request is served statelessly, without a cookie, and counted.

The edge keeps no placement cache: the registry's answer carries the worker's epoch, and a stale cached answer
could send a conversation to a restarted worker; one registry call per request is the whole cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ark.sessions.v1 import session_registry_service_pb2 as sessions_pb
from edge.clients.registry import SessionRegistryClient
from edge.metrics import STATELESS_FALLBACKS
from edge.sessions.cookies import parse_session_id
from services.common.config import SessionsConfig
from services.common.errors import ArkError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Placement:
    session_id: str
    worker_name: str
    worker_address: str
    # The worker's incarnation counter when the placement was made (a restarted worker has a higher one).
    worker_epoch: int
    model: str
    conversation_key: str
    is_new: bool


class SessionPlacer:
    def __init__(self, registry: SessionRegistryClient | None, policy: SessionsConfig) -> None:
        self._registry = registry if policy.enabled else None
        self.policy = policy

    @property
    def enabled(self) -> bool:
        return self._registry is not None

    async def place(
        self, cookie: str | None, api_key_hash: str, model: str, conversation_key: str, soonest: Sequence[str] = ()
    ) -> Placement | None:
        """A placement for the request, or None to serve it statelessly. A new conversation goes to one of the
        `soonest` workers (by address) when one of them is live: ChatWorkers.soonest()."""
        if self._registry is None:
            return None
        session_id = parse_session_id(cookie) or ""
        try:
            reply = await self._registry.place(api_key_hash, model, session_id, conversation_key, soonest=soonest)
        except ArkError as exc:
            STATELESS_FALLBACKS.inc()
            log.warning("session registry unavailable (%s): serving statelessly", exc.message)
            return None
        return _placement(reply, model, conversation_key)

    async def replace(self, placement: Placement, api_key_hash: str, soonest: Sequence[str] = ()) -> Placement | None:
        """The conversation's worker is gone: a new session (new id, new cookie) with the conversation on another
        worker (one of the `soonest` when one of them is live), or None for stateless."""
        assert self._registry is not None
        try:
            reply = await self._registry.place(
                api_key_hash,
                placement.model,
                placement.session_id,
                placement.conversation_key,
                failed_worker=placement.worker_name,
                soonest=soonest,
            )
        except ArkError as exc:
            STATELESS_FALLBACKS.inc()
            log.warning("could not re-place the conversation (%s): serving statelessly", exc.message)
            return None
        return _placement(reply, placement.model, placement.conversation_key)

    async def lookup(self, cookie: str | None, api_key_hash: str) -> sessions_pb.Session | None:
        """The caller's current session, or None (disabled, no cookie, unknown, expired, foreign)."""
        session_id = parse_session_id(cookie)
        if self._registry is None or session_id is None:
            return None
        try:
            return await self._registry.get(session_id, api_key_hash)
        except ArkError:
            return None  # unknown, expired or foreign, or the registry unreachable: no session to show

    async def end(self, session_id: str, api_key_hash: str) -> None:
        """End the session; a registry outage is UnavailableError (503)."""
        assert self._registry is not None
        await self._registry.delete(session_id, api_key_hash)


def _placement(reply: sessions_pb.PlaceConversationResponse, model: str, conversation_key: str) -> Placement:
    return Placement(
        reply.session.id,
        reply.worker.name,
        reply.worker.address,
        reply.worker.epoch,
        model,
        conversation_key,
        reply.session_created,
    )
