"""The stored-object contract (responses and conversations of the Responses API), run on both implementations: in
memory and on a real redis-server. Ownership (another key's object is absent), quotas, items in order with pages,
deletion, and that a Redis-backed object outlives the store client that wrote it (a registry restart)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from services.common.config import SessionsConfig
from services.common.errors import ConflictError, InvalidRequestError, QuotaExceededError
from services.sessions.objects import InMemoryObjectStore, ObjectStore, StoredItem
from services.sessions.redis_objects import RedisObjectStore
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

MakeStore = Callable[..., Awaitable[ObjectStore]]


@pytest.fixture(params=["memory", "redis"])
async def make_store(request, redis_server: RedisServer) -> AsyncIterator[MakeStore]:  # noqa: F811
    made: list[ObjectStore] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}:"

    async def make(**overrides) -> ObjectStore:
        policy = SessionsConfig(**overrides)
        if request.param == "redis":
            policy = policy.model_copy(update={"store": redis_server.url, "store_key_prefix": prefix})
            store: ObjectStore = RedisObjectStore(policy)
        else:
            store = InMemoryObjectStore(policy)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def items(*ids: str) -> list[StoredItem]:
    return [StoredItem(i, f'{{"id":"{i}"}}') for i in ids]


async def test_an_object_is_visible_to_its_owner_only(make_store):
    store = await make_store()
    created = await store.create("k1", "response", "resp_1", '{"a":1}', "sess", items("a", "b"))
    assert created.payload == '{"a":1}' and created.session_id == "sess"
    assert created.expires_at - created.created_at == pytest.approx(30 * 86400, abs=2)
    assert (await store.get("k1", "response", "resp_1")).payload == '{"a":1}'
    assert await store.get("k2", "response", "resp_1") is None
    assert await store.get("k1", "conversation", "resp_1") is None  # kinds are separate
    assert await store.update("k2", "response", "resp_1", "{}") is None
    assert await store.delete("k2", "response", "resp_1") is None
    assert await store.list_items("k2", "response", "resp_1") is None
    assert not await store.append_items("k2", "response", "resp_1", items("c"))
    assert await store.get_item("k2", "response", "resp_1", "a") is None
    assert not await store.delete_item("k2", "response", "resp_1", "a")
    assert [i.id for i in (await store.list_items("k1", "response", "resp_1"))[0]] == ["a", "b"]


async def test_update_replaces_the_payload_and_keeps_the_session_unless_given(make_store):
    store = await make_store()
    await store.create("k", "conversation", "conv_1", "{}", "", [])
    assert (await store.update("k", "conversation", "conv_1", '{"x":2}', "s1")).session_id == "s1"
    updated = await store.update("k", "conversation", "conv_1", '{"x":3}')
    assert updated.payload == '{"x":3}' and updated.session_id == "s1"


async def test_an_update_with_an_etag_applies_only_to_the_version_read(make_store):
    store = await make_store()
    read = await store.create("k1", "response", "resp_1", '{"status":"in_progress"}', "", [])
    # Two writers read the same version; the first write wins, the second finds it changed.
    first = await store.update("k1", "response", "resp_1", '{"status":"cancelled"}', etag=read.etag)
    assert first.payload == '{"status":"cancelled"}' and first.etag != read.etag
    with pytest.raises(ConflictError):
        await store.update("k1", "response", "resp_1", '{"status":"completed"}', etag=read.etag)
    assert (await store.get("k1", "response", "resp_1")).payload == '{"status":"cancelled"}'
    again = await store.update("k1", "response", "resp_1", '{"status":"cancelled","n":1}', etag=first.etag)
    assert again.etag == (await store.get("k1", "response", "resp_1")).etag
    assert await store.update("k2", "response", "resp_1", "{}", etag=first.etag) is None  # another key's: absent


async def test_items_page_in_both_orders(make_store):
    store = await make_store()
    await store.create("k", "conversation", "c", "{}", "", items("a", "b"))
    assert await store.append_items("k", "conversation", "c", items("c", "d", "e"))
    page, more = await store.list_items("k", "conversation", "c", limit=2)
    assert [i.id for i in page] == ["a", "b"] and more
    page, more = await store.list_items("k", "conversation", "c", after="b", limit=2)
    assert [i.id for i in page] == ["c", "d"] and more
    page, more = await store.list_items("k", "conversation", "c", after="d", limit=2)
    assert [i.id for i in page] == ["e"] and not more
    page, more = await store.list_items("k", "conversation", "c", descending=True, limit=3)
    assert [i.id for i in page] == ["e", "d", "c"] and more
    assert (await store.get_item("k", "conversation", "c", "d")).payload == '{"id":"d"}'
    assert await store.delete_item("k", "conversation", "c", "d")
    assert not await store.delete_item("k", "conversation", "c", "d")
    assert [i.id for i in (await store.list_items("k", "conversation", "c"))[0]] == ["a", "b", "c", "e"]


async def test_delete_removes_the_object_and_its_items_and_frees_the_quota(make_store):
    store = await make_store(max_stored_per_api_key=2)
    await store.create("k", "response", "r1", "{}", "s", items("a"))
    await store.create("k", "response", "r2", "{}", "", [])
    await store.create("k", "conversation", "c1", "{}", "", [])  # quotas are per kind
    await store.create("other", "response", "r3", "{}", "", [])  # and per key
    with pytest.raises(QuotaExceededError):
        await store.create("k", "response", "r4", "{}", "", [])
    removed = await store.delete("k", "response", "r1")
    assert removed is not None and removed.session_id == "s"
    assert await store.get("k", "response", "r1") is None
    await store.create("k", "response", "r4", "{}", "", [])
    with pytest.raises(InvalidRequestError):
        await store.create("other", "response", "r4", "{}", "", [])  # an id is taken whoever owns it


async def test_a_shared_store_outlives_the_client_that_wrote_it(redis_server: RedisServer):  # noqa: F811
    policy = SessionsConfig(store=redis_server.url, store_key_prefix=f"test-{uuid.uuid4().hex[:8]}:")
    first = RedisObjectStore(policy)
    await first.create("k", "response", "r", '{"v":1}', "", items("a"))
    await first.close()
    second = RedisObjectStore(policy)
    try:
        assert (await second.get("k", "response", "r")).payload == '{"v":1}'
        assert [i.id for i in (await second.list_items("k", "response", "r"))[0]] == ["a"]
    finally:
        await second.close()
