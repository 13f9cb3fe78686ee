"""gRPC stays behind the edge's clients: a session registry that cannot be reached is an ArkError, never a
grpc.RpcError, so that placement serves statelessly and ending a session is a 503 (edge/sessions/placement.py)."""

from __future__ import annotations

import pytest

from edge.clients.registry import SessionRegistryClient
from edge.sessions.placement import SessionPlacer
from services.common.config import SessionsConfig
from services.common.errors import UnavailableError
from tests.support.stack import free_port

SESSION_ID = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
async def unreachable_registry():
    client = SessionRegistryClient(f"127.0.0.1:{free_port()}", timeout=0.5)
    yield client
    await client.close()


async def test_the_client_raises_ark_errors_only(unreachable_registry):
    with pytest.raises(UnavailableError):
        await unreachable_registry.place("key", "m", "", "conversation")
    with pytest.raises(UnavailableError):
        await unreachable_registry.get(SESSION_ID, "key")
    with pytest.raises(UnavailableError):
        await unreachable_registry.delete(SESSION_ID, "key")


async def test_placement_serves_statelessly_and_ending_a_session_is_a_503(unreachable_registry):
    placer = SessionPlacer(unreachable_registry, SessionsConfig())
    assert await placer.place(None, "key", "m", "conversation") is None
    assert await placer.lookup(SESSION_ID, "key") is None
    with pytest.raises(UnavailableError) as info:
        await placer.end(SESSION_ID, "key")
    assert info.value.http_status == 503
