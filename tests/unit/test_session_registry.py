"""Registry logic: placement, leases, expiry, caps, ownership — on a fake clock, no gRPC."""

from __future__ import annotations

import pytest

from services.common.config import SessionsConfig
from services.common.errors import NotFoundError, UnavailableError
from services.sessions.registry import Registry
from services.sessions.store import InMemorySessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env():
    clock = Clock()
    drops: list[tuple[str, str]] = []
    reachable = {"ok": True}

    async def on_drop(address: str, session_id: str) -> bool:
        drops.append((address, session_id))
        return reachable["ok"]

    policy = SessionsConfig(idle_timeout_seconds=60, max_age_seconds=300, max_per_api_key=3, max_total=5)
    registry = Registry(InMemorySessionStore(), policy, on_drop=on_drop, clock=clock)
    for name in ("w1", "w2"):
        registry.renew_lease(name, f"{name}:1", ("m",), 4, 10)
    return registry, clock, drops, reachable


async def test_sessions_spread_over_live_workers(env):
    registry, *_ = env
    a = await registry.create("k", "m")
    b = await registry.create("k", "m")
    assert {a.worker_name, b.worker_name} == {"w1", "w2"}
    assert a.id != b.id


async def test_lapsed_lease_gets_no_sessions_and_no_worker_is_unavailable(env):
    registry, clock, *_ = env
    clock.now += 11
    registry.renew_lease("w2", "w2:1", ("m",), 4, 10)
    assert {(await registry.create("k", "m")).worker_name for _ in range(3)} == {"w2"}
    with pytest.raises(UnavailableError):
        await registry.create("k", "other-model")


async def test_unknown_foreign_and_expired_look_the_same(env):
    registry, clock, _drops, _ = env
    session = await registry.create("owner", "m")
    errors = []
    for sid, key in [("no-such-id", "owner"), (session.id, "intruder")]:
        with pytest.raises(NotFoundError) as info:
            registry.get(sid, key)
        errors.append(info.value.to_dict())
    clock.now += 61
    with pytest.raises(NotFoundError) as info:
        registry.get(session.id, "owner")
    errors.append(info.value.to_dict())
    assert errors[0] == errors[1] == errors[2]


async def test_use_extends_idle_life_but_not_max_age(env):
    registry, clock, drops, _ = env
    session = await registry.create("k", "m")
    for _ in range(5):
        clock.now += 50
        registry.get(session.id, "k")
    clock.now += 50  # 300 s after creation
    assert await registry.sweep() == 1
    assert drops == [(session.worker_address, session.id)]


async def test_idle_expiry_tells_the_worker(env):
    registry, clock, drops, _ = env
    session = await registry.create("k", "m")
    clock.now += 30
    assert await registry.sweep() == 0
    clock.now += 31
    assert await registry.sweep() == 1
    assert drops == [(session.worker_address, session.id)]


async def test_unreachable_worker_learns_drops_at_renewal(env):
    registry, _clock, _drops, reachable = env
    reachable["ok"] = False
    session = await registry.create("k", "m")
    await registry.delete(session.id, "k")
    _, dropped = registry.renew_lease(session.worker_name, session.worker_address, ("m",), 4, 10)
    assert dropped == [session.id]
    assert registry.renew_lease(session.worker_name, session.worker_address, ("m",), 4, 10)[1] == []


async def test_caps_evict_least_recently_used(env):
    registry, clock, drops, _ = env
    first = await registry.create("k", "m")
    clock.now += 1
    second = await registry.create("k", "m")
    clock.now += 1
    await registry.create("k", "m")
    clock.now += 1
    registry.get(first.id, "k")  # first is now more recent than second
    await registry.create("k", "m")  # per-key cap 3: evicts `second`
    assert [sid for _, sid in drops] == [second.id]
    for i in range(3):
        clock.now += 1
        await registry.create(f"other{i}", "m")
    assert len(registry._store.sessions()) == 5  # global cap


async def test_replace_moves_to_another_worker_with_a_new_id(env):
    registry, *_ = env
    session = await registry.create("k", "m")
    moved = await registry.replace(session.id, "k", session.worker_name)
    assert moved.id != session.id and moved.worker_name != session.worker_name
    with pytest.raises(NotFoundError):
        registry.get(session.id, "k")
