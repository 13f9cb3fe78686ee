"""Stored objects on the Redis-protocol server the session store uses: what every registry (and so every edge) sees.

Each operation is one Lua script (atomic, one round trip, the server's clock). Keys under `sessions.store_key_prefix`:
`o:<kind>:<id>` (hash: owner, payload, session, created, expires; PEXPIREAT at the retention), `o:<kind>:<id>:ids`
(the item order, a list) and `o:<kind>:<id>:items` (item id -> JSON, a hash), both expiring with the object, and
`q:<owner>:<kind>` (the key's objects of a kind, scored by expiry: the quota).
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from services.common.config import SessionsConfig
from services.common.errors import UnavailableError
from services.sessions.objects import (
    ObjectStore,
    StoredItem,
    StoredObject,
    changed,
    id_taken,
    page,
    quota_exceeded,
)

log = logging.getLogger(__name__)

_PRELUDE = """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ok_ = P .. 'o:' .. ARGV[3] .. ':' .. ARGV[4]
local function owned()
  return redis.call('HGET', ok_, 'owner') == ARGV[2]
end
local function record()
  return redis.call('HMGET', ok_, 'payload', 'session', 'created', 'expires')
end
"""

# ARGV: prefix, owner, kind, id, payload, session, retention ms, quota, then item id/payload pairs
_CREATE = """
if redis.call('EXISTS', ok_) == 1 then return 'taken' end
local q = P .. 'q:' .. ARGV[2] .. ':' .. ARGV[3]
redis.call('ZREMRANGEBYSCORE', q, '-inf', now)
if redis.call('ZCARD', q) >= tonumber(ARGV[8]) then return 'quota' end
local expires = now + tonumber(ARGV[7])
redis.call('HSET', ok_, 'owner', ARGV[2], 'payload', ARGV[5], 'session', ARGV[6], 'created', now, 'expires', expires)
for i = 9, #ARGV, 2 do
  redis.call('RPUSH', ok_ .. ':ids', ARGV[i])
  redis.call('HSET', ok_ .. ':items', ARGV[i], ARGV[i + 1])
end
for _, k in ipairs({ok_, ok_ .. ':ids', ok_ .. ':items'}) do redis.call('PEXPIREAT', k, expires) end
redis.call('ZADD', q, expires, ARGV[4])
redis.call('PEXPIREAT', q, expires)
return record()
"""

_GET = """
if not owned() then return false end
return record()
"""

# ARGV: prefix, owner, kind, id, payload, session ('' keeps it), etag ('' for none: the payload's SHA-1)
_UPDATE = """
if not owned() then return false end
if ARGV[7] ~= '' and redis.sha1hex(redis.call('HGET', ok_, 'payload')) ~= ARGV[7] then return 'changed' end
redis.call('HSET', ok_, 'payload', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', ok_, 'session', ARGV[6]) end
return record()
"""

_DELETE = """
if not owned() then return false end
local r = record()
redis.call('DEL', ok_, ok_ .. ':ids', ok_ .. ':items')
redis.call('ZREM', P .. 'q:' .. ARGV[2] .. ':' .. ARGV[3], ARGV[4])
return r
"""

# ARGV: prefix, owner, kind, id, then item id/payload pairs
_APPEND = """
if not owned() then return 0 end
local expires = tonumber(redis.call('HGET', ok_, 'expires'))
for i = 5, #ARGV, 2 do
  if redis.call('HEXISTS', ok_ .. ':items', ARGV[i]) == 0 then redis.call('RPUSH', ok_ .. ':ids', ARGV[i]) end
  redis.call('HSET', ok_ .. ':items', ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIREAT', ok_ .. ':ids', expires)
redis.call('PEXPIREAT', ok_ .. ':items', expires)
return 1
"""

_IDS = """
if not owned() then return false end
return redis.call('LRANGE', ok_ .. ':ids', 0, -1)
"""

# ARGV: prefix, owner, kind, id, item ids...
_ITEMS = """
if not owned() then return false end
if #ARGV < 5 then return {} end
return redis.call('HMGET', ok_ .. ':items', unpack(ARGV, 5))
"""

# ARGV: prefix, owner, kind, id, item id
_DELETE_ITEM = """
if not owned() then return 0 end
if redis.call('HDEL', ok_ .. ':items', ARGV[5]) == 0 then return 0 end
redis.call('LREM', ok_ .. ':ids', 0, ARGV[5])
return 1
"""


class RedisObjectStore(ObjectStore):
    def __init__(self, policy: SessionsConfig) -> None:
        super().__init__(policy)
        self._client = redis.from_url(
            policy.store, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._prefix = policy.store_key_prefix

        def script(body: str):
            return self._client.register_script(_PRELUDE + body)

        self._create, self._get, self._update, self._delete = map(script, (_CREATE, _GET, _UPDATE, _DELETE))
        self._append, self._ids, self._items, self._delete_item = map(script, (_APPEND, _IDS, _ITEMS, _DELETE_ITEM))

    async def _run(self, script, owner: str, kind: str, object_id: str, *args: Any) -> Any:
        try:
            return await script(args=[self._prefix, owner, kind, object_id, *args])
        except (RedisError, ResponseError) as exc:
            log.warning("object store unreachable: %s", exc)
            raise UnavailableError("The store of responses and conversations is unavailable.") from None

    @staticmethod
    def _object(kind: str, object_id: str, raw: list[Any] | None) -> StoredObject | None:
        if not raw:
            return None
        payload, session, created, expires = raw
        return StoredObject(kind, object_id, payload or "", session or "", int(created) / 1000, int(expires) / 1000)

    async def create(self, owner, kind, object_id, payload, session_id, items):
        pairs = [x for i in items for x in (i.id, i.payload)]
        retention_ms = self.policy.stored_retention_seconds * 1000
        raw = await self._run(
            self._create, owner, kind, object_id, payload, session_id, retention_ms,
            self.policy.max_stored_per_api_key, *pairs,
        )  # fmt: skip
        if raw == "taken":
            raise id_taken(kind, object_id)
        if raw == "quota":
            raise quota_exceeded(kind, self.policy.max_stored_per_api_key)
        return self._object(kind, object_id, raw)

    async def get(self, owner, kind, object_id):
        return self._object(kind, object_id, await self._run(self._get, owner, kind, object_id))

    async def update(self, owner, kind, object_id, payload, session_id="", etag=""):
        raw = await self._run(self._update, owner, kind, object_id, payload, session_id, etag)
        if raw == "changed":
            raise changed(kind, object_id)
        return self._object(kind, object_id, raw)

    async def delete(self, owner, kind, object_id):
        return self._object(kind, object_id, await self._run(self._delete, owner, kind, object_id))

    async def append_items(self, owner, kind, object_id, items):
        pairs = [x for i in items for x in (i.id, i.payload)]
        return bool(await self._run(self._append, owner, kind, object_id, *pairs))

    async def list_items(self, owner, kind, object_id, *, after="", limit=0, descending=False):
        ids = await self._run(self._ids, owner, kind, object_id)
        if ids is None:
            return None
        chosen, more = page(ids, after, limit, descending)
        payloads = await self._run(self._items, owner, kind, object_id, *chosen)
        if payloads is None:
            return None
        return [StoredItem(i, p) for i, p in zip(chosen, payloads, strict=True) if p is not None], more

    async def get_item(self, owner, kind, object_id, item_id):
        payloads = await self._run(self._items, owner, kind, object_id, item_id)
        if not payloads or payloads[0] is None:
            return None
        return StoredItem(item_id, payloads[0])

    async def delete_item(self, owner, kind, object_id, item_id):
        return bool(await self._run(self._delete_item, owner, kind, object_id, item_id))

    async def close(self):
        await self._client.aclose()
