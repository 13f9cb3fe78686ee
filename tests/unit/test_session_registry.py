"""Registry logic over the in-memory store on a fake clock: drop delivery, the sweeper's lease, errors. (The store's
own contract, on memory and on Redis, is in tests/integration/test_session_store.py.)"""

from __future__ import annotations

import asyncio

import pytest

from services.common.config import SessionsConfig
from services.common.errors import NotFoundError
from services.sessions.registry import Registry
from services.sessions.store import InMemorySessionStore

MODEL = "m"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Workers:
    """What the registry tells workers; `reachable` decides whether a worker acknowledges."""

    def __init__(self) -> None:
        self.drops: list[tuple[str, str]] = []
        self.reachable = True

    async def drop(self, address: str, session_id: str) -> bool:
        self.drops.append((address, session_id))
        return self.reachable


@pytest.fixture
async def env():
    clock = Clock()
    policy = SessionsConfig(idle_timeout_seconds=60, max_age_seconds=300, max_per_api_key=2, max_total=5)
    store = InMemorySessionStore(policy, clock=clock)
    workers = Workers()
    registry = Registry(store, on_drop=workers.drop)
    for name in ("w1", "w2"):
        await registry.renew_lease(name, f"{name}:1", (MODEL,), 4, "first", 10_000)
    return registry, clock, workers


async def test_unknown_foreign_and_expired_sessions_look_the_same(env):
    registry, clock, _ = env
    session = (await registry.place("owner", MODEL, "", "c1")).session
    errors = []
    for sid, key in [("no-such-id", "owner"), (session.id, "intruder")]:
        with pytest.raises(NotFoundError) as info:
            await registry.get(sid, key)
        errors.append(info.value.to_dict())
    clock.now += 61
    with pytest.raises(NotFoundError) as info:
        await registry.get(session.id, "owner")
    errors.append(info.value.to_dict())
    assert errors[0] == errors[1] == errors[2]


async def test_delete_tells_every_worker_of_the_session(env):
    registry, _, workers = env
    first = await registry.place("k", MODEL, "", "c1")
    second = await registry.place("k", MODEL, first.session.id, "c2")
    await registry.delete(first.session.id, "k")
    assert sorted(workers.drops) == sorted(
        [(first.worker.address, first.session.id), (second.worker.address, first.session.id)]
    )
    # Acknowledged drops are not handed over again at renewal.
    assert (await registry.renew_lease("w1", "w1:1", (MODEL,), 4, "first", 10))[1] == []
    with pytest.raises(NotFoundError):
        await registry.delete(first.session.id, "k")


async def test_an_unreachable_worker_learns_its_drops_at_renewal(env):
    registry, _, workers = env
    workers.reachable = False
    placed = await registry.place("k", MODEL, "", "c1")
    await registry.delete(placed.session.id, "k")
    assert (await registry.renew_lease(placed.worker.name, placed.worker.address, (MODEL,), 4, "first", 10))[1] == [
        placed.session.id
    ]


async def test_evictions_are_delivered_off_the_request_path(env):
    registry, _, workers = env
    first = await registry.place("k", MODEL, "", "a")
    await registry.place("k", MODEL, "", "b")
    await registry.place("k", MODEL, "", "c")  # per-key cap 2: `first` is evicted
    for _ in range(100):
        if workers.drops:
            break
        await asyncio.sleep(0.01)
    assert workers.drops == [(first.worker.address, first.session.id)]


async def test_only_the_sweeper_lease_holder_expires_sessions(env):
    registry, clock, workers = env
    other = Registry(registry.store, on_drop=workers.drop)  # a second registry on the same store
    placed = await registry.place("k", MODEL, "", "c1")
    clock.now += 59
    assert await registry.sweep() == 0  # nothing expired yet; `registry` now holds the lease
    clock.now += 2
    assert await other.sweep() == 0  # expired, but the lease is not `other`'s
    clock.now += 2  # the holder stopped renewing its lease
    assert await other.sweep() == 1
    assert workers.drops == [(placed.worker.address, placed.session.id)]
