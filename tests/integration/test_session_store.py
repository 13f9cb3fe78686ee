"""The session store's contract, run on both implementations: in memory and on a real redis-server.

Placement by conversation, session validation, caps with LRU eviction, expiry (idle and absolute), compare-and-set
re-placement after a worker failure, epoch fencing after a worker restart, drop delivery at lease renewal, leases.
Expiry tests use real time (the Redis store takes time from the server) with timeouts of one second, and wait for
conditions rather than fixed delays.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from services.common.config import SessionsConfig
from services.common.errors import UnavailableError
from services.sessions.redis_store import RedisSessionStore
from services.sessions.store import InMemorySessionStore, SessionStore
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

MODEL = "m"
POLICY = {"idle_timeout_seconds": 60, "max_age_seconds": 300, "max_per_api_key": 3, "max_total": 5}

MakeStore = Callable[..., Awaitable[SessionStore]]


@pytest.fixture(params=["memory", "redis"])
async def make_store(request, redis_server: RedisServer) -> AsyncIterator[MakeStore]:  # noqa: F811
    """A factory of empty stores of one kind, each with two live workers `w1` and `w2` serving MODEL."""
    made: list[SessionStore] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}:"

    async def make(**overrides) -> SessionStore:
        policy = SessionsConfig(**(POLICY | overrides))
        if request.param == "redis":
            policy = policy.model_copy(update={"store": redis_server.url, "store_key_prefix": prefix})
            store: SessionStore = RedisSessionStore(policy)
        else:
            store = InMemorySessionStore(policy)
        made.append(store)
        for name in ("w1", "w2"):
            await store.renew_worker(name, f"{name}:1", (MODEL,), 4, "first", 30)
        return store

    yield make
    for store in made:
        await store.close()


async def place(store: SessionStore, session_id: str = "", conversation: str = "c1", key: str = "k", **kw):
    result = await store.place(key, MODEL, session_id, conversation, new_session_id=str(uuid.uuid4()), **kw)
    return result.placement


async def wait_until(condition: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_a_conversation_stays_on_its_worker_and_a_session_spreads_by_load(make_store):
    store = await make_store()
    first = await place(store, conversation="c1")
    assert first.session_is_new and first.placed_now
    again = await place(store, first.session.id, conversation="c1")
    assert again.session.id == first.session.id and not again.session_is_new
    assert again.worker.name == first.worker.name and not again.placed_now
    other = await place(store, first.session.id, conversation="c2")
    assert other.session.id == first.session.id
    assert other.worker.name != first.worker.name  # the least loaded worker
    assert {w.name: w.placed for w in await store.live_workers(MODEL)} == {"w1": 1, "w2": 1}


async def test_a_new_conversation_goes_to_a_worker_that_would_start_it_soonest(make_store):
    store = await make_store()
    first = await place(store, conversation="c1")  # w1 (the least loaded by conversations, by name)
    # The edge says w1 would start a request soonest (w2 is busy with other requests): the new one goes there,
    # though w1 already holds more conversations.
    busy_elsewhere = await place(store, first.session.id, conversation="c2", soonest=[f"{first.worker.name}:1"])
    assert busy_elsewhere.placed_now and busy_elsewhere.worker.name == first.worker.name
    # A conversation already placed stays where its state is, whatever the edge says.
    kept = await place(store, first.session.id, conversation="c1", soonest=["w2:1"])
    assert kept.worker.name == first.worker.name and not kept.placed_now
    # Addresses of no live worker are no preference: the least loaded by conversations.
    other = await place(store, first.session.id, conversation="c3", soonest=["gone:1"])
    assert other.worker.name != first.worker.name
    # Several soonest (a tie): the least loaded of them.
    tied = await place(store, first.session.id, conversation="c4", soonest=["w1:1", "w2:1"])
    assert tied.worker.name == other.worker.name


async def test_without_a_cookie_a_conversation_is_placed_by_content_within_its_key(make_store):
    store = await make_store()
    a = await place(store, "", conversation="c1")
    b = await place(store, "", conversation="c1")
    assert a.session.id != b.session.id  # each cookie-less request gets a session of its own
    assert b.worker.name == a.worker.name and not b.placed_now
    foreign = await place(store, "", conversation="c1", key="other-key")
    assert foreign.placed_now  # never across API keys, whatever the content


@pytest.mark.parametrize("presented", ["", "not-a-session", str(uuid.uuid4()), "FOREIGN"])
async def test_unknown_malformed_and_foreign_sessions_are_never_adopted(make_store, presented):
    store = await make_store()
    owner = await place(store, key="owner")
    presented = owner.session.id if presented == "FOREIGN" else presented
    got = await place(store, presented, key="intruder")
    assert got.session_is_new and got.session.id not in (presented, owner.session.id)
    assert got.session.api_key_hash == "intruder"
    assert (await store.get_session(owner.session.id, "owner")) is not None  # the owner's session is untouched
    assert (await store.get_session(owner.session.id, "intruder")) is None


async def test_no_live_worker_is_unavailable_and_changes_nothing(make_store):
    store = await make_store()
    with pytest.raises(UnavailableError):
        await store.place("k", "other-model", "", "c1", new_session_id="s-1")
    assert (await store.get_session("s-1", "k")) is None


async def test_a_lapsed_lease_gets_nothing_new_and_its_conversations_move(make_store):
    store = await make_store()
    for busy in ("x1", "x2"):  # one conversation each on w1 and w2
        await place(store, conversation=busy)
    await store.renew_worker("w3", "w3:1", (MODEL,), 4, "first", 0.3)  # idle, with a short lease
    on_w3 = await place(store, conversation="c1")
    assert on_w3.worker.name == "w3"
    await wait_until(lambda: _names(store, exclude="w3"))
    moved = await place(store, on_w3.session.id, conversation="c1")
    assert moved.worker.name in ("w1", "w2") and moved.placed_now
    assert moved.session.id == on_w3.session.id  # the session survives, the conversation is recomputed elsewhere


async def _names(store: SessionStore, exclude: str) -> bool:
    return exclude not in {w.name for w in await store.live_workers(MODEL)}


async def test_a_restarted_worker_gets_a_new_epoch_and_its_placements_are_not_trusted(make_store):
    store = await make_store()
    first = await place(store, conversation="c1")
    same, _ = await store.renew_worker(first.worker.name, first.worker.address, (MODEL,), 4, "first", 30)
    assert same.epoch == first.worker.epoch  # a renewal is not a restart
    restarted, _ = await store.renew_worker(first.worker.name, first.worker.address, (MODEL,), 4, "second", 30)
    assert restarted.epoch == first.worker.epoch + 1 and restarted.placed == 0
    again = await place(store, first.session.id, conversation="c1")
    assert again.placed_now and again.worker.epoch == restarted.epoch


async def test_a_worker_that_left_and_returns_is_still_fenced(make_store):
    store = await make_store()
    first, _ = await store.renew_worker("w3", "w3:1", (MODEL,), 4, "one", 0.2)
    await wait_until(lambda: _names(store, exclude="w3"))
    await store.end_expired()  # the sweep forgets departed workers in what placement scans
    back, _ = await store.renew_worker("w3", "w3:1", (MODEL,), 4, "two", 30)
    assert back.epoch == first.epoch + 1


async def test_a_failed_worker_moves_the_conversation_once_and_renews_the_session(make_store):
    store = await make_store()
    first = await place(store, conversation="c1")
    other = await place(store, first.session.id, conversation="c2")
    failed = first.worker.name
    result = await store.place("k", MODEL, first.session.id, "c1", new_session_id="s-new", failed_worker=failed)
    moved = result.placement
    assert moved.worker.name != failed and moved.placed_now
    assert moved.session_is_new and moved.session.id == "s-new"  # a new cookie, as the contract says
    [ended] = result.ended
    assert ended.id == first.session.id
    assert {name for name, _ in ended.workers} == {first.worker.name, other.worker.name}
    # A second edge that saw the same failure finds the conversation already moved: compare-and-set keeps it.
    late = await place(store, "", conversation="c1", failed_worker=failed)
    assert late.worker.name == moved.worker.name and not late.placed_now


async def test_caps_evict_the_least_recently_used_session_and_record_drops(make_store):
    store = await make_store()
    first = await place(store, conversation="a")
    await next_millisecond()  # the stores order by last use to the millisecond (Redis' TIME): no ties
    second = await place(store, conversation="b")
    await next_millisecond()
    await place(store, conversation="c")
    await next_millisecond()
    await store.get_session(first.session.id, "k")  # first is now more recent than second
    await next_millisecond()
    result = await store.place("k", MODEL, "", "d", new_session_id="s-4")  # per-key cap 3
    assert [e.id for e in result.ended] == [second.session.id]
    assert (await store.get_session(second.session.id, "k")) is None
    assert (await store.get_session(first.session.id, "k")) is not None
    evicted = []
    for i in range(3):  # other keys fill the global cap of 5: the oldest sessions go, whoever owns them
        evicted += (await store.place(f"other{i}", MODEL, "", "x", new_session_id=f"o-{i}")).ended
    assert len(evicted) == 1
    _, drops = await store.renew_worker(second.worker.name, second.worker.address, (MODEL,), 4, "first", 30)
    assert second.session.id in drops


async def test_idle_expiry_is_enforced_by_the_store_and_reported_once(make_store):
    store = await make_store(idle_timeout_seconds=1)
    session = (await place(store)).session
    await wait_until(lambda: _past(session.expires_at + 0.05))
    assert (await store.get_session(session.id, "k")) is None  # gone for readers before any sweep
    await wait_until(lambda: _expired(store, session.id))
    assert session.id not in [e.id for e in await store.end_expired()]  # ended once
    _, drops = await store.renew_worker(session.worker_name, session.worker_address, (MODEL,), 4, "first", 30)
    assert drops == [session.id]


async def next_millisecond() -> None:
    """Return once the wall clock's millisecond has moved on (by two, so that clocks read apart agree)."""
    start = int(time.time() * 1000)
    await wait_until(lambda: _past((start + 2) / 1000))


async def _past(when: float) -> bool:
    return time.time() > when


async def _gone(store: SessionStore, session_id: str) -> bool:
    return await store.get_session(session_id, "k") is None


async def _expired(store: SessionStore, session_id: str) -> bool:
    return session_id in [e.id for e in await store.end_expired()]


async def test_use_slides_the_idle_timer_but_not_the_maximum_age(make_store):
    store = await make_store(idle_timeout_seconds=2, max_age_seconds=3)
    placed = await place(store)
    assert placed.session.expires_at == pytest.approx(placed.session.created_at + 2, abs=0.01)
    deadline = placed.session.created_at + 3
    seen_alive_after_idle = False
    while time.time() < deadline - 0.3:
        touched = await store.get_session(placed.session.id, "k")
        assert touched is not None and touched.expires_at <= deadline + 0.01
        seen_alive_after_idle |= touched.last_used_at > placed.session.created_at + 2
        await asyncio.sleep(0.3)
    assert seen_alive_after_idle  # kept alive past one idle timeout by use
    await wait_until(lambda: _gone(store, placed.session.id))  # and still gone at the maximum age


async def test_delete_is_owner_only_and_drops_reach_each_worker_once(make_store):
    store = await make_store()
    first = await place(store, conversation="c1")
    second = await place(store, first.session.id, conversation="c2")
    assert await store.end_session(first.session.id, "intruder") is None
    ended = await store.end_session(first.session.id, "k")
    assert ended is not None and {n for n, _ in ended.workers} == {first.worker.name, second.worker.name}
    assert await store.end_session(first.session.id, "k") is None
    await store.ack_drop(first.worker.name, first.session.id)  # delivered at once to this one
    renewals = {}
    for name in (first.worker.name, second.worker.name):
        renewals[name] = (await store.renew_worker(name, f"{name}:1", (MODEL,), 4, "first", 30))[1]
    assert renewals == {first.worker.name: [], second.worker.name: [first.session.id]}
    assert (await store.renew_worker(second.worker.name, "x", (MODEL,), 4, "first", 30))[1] == []


async def test_a_lease_has_one_holder_at_a_time(make_store):
    store = await make_store()
    assert await store.hold_lease("sweeper", "a", 0.5)
    assert not await store.hold_lease("sweeper", "b", 0.5)
    assert await store.hold_lease("sweeper", "a", 0.5)
    await wait_until(lambda: store.hold_lease("sweeper", "b", 0.5))


# -- the Redis store only -------------------------------------------------------------------------------------------


async def test_sessions_survive_new_registries_and_a_store_restart(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    policy = SessionsConfig(store=server.url)
    try:
        store = RedisSessionStore(policy)
        await store.renew_worker("w1", "w1:1", (MODEL,), 4, "first", 60)
        placed = (await store.place("k", MODEL, "", "c1", new_session_id="s-1")).placement
        await store.close()
        server.stop()
        fresh = RedisSessionStore(policy)  # a new registry process, while the store is down
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await fresh.place("k", MODEL, placed.session.id, "c1", new_session_id="s-2")
        assert time.monotonic() - started < 2  # fails fast: the edge serves statelessly instead of waiting
        server.start()
        resumed = (await fresh.place("k", MODEL, placed.session.id, "c1", new_session_id="s-3")).placement
        assert resumed.session.id == placed.session.id and not resumed.session_is_new
        assert resumed.worker.name == "w1" and not resumed.placed_now
        await fresh.close()
    finally:
        server.stop()
