"""The session store on a Redis-protocol server (Valkey, Redis 7): what several registries share.

Every decision is one Lua script, so it is atomic on the server and costs one round trip: `place` (session check or
create-with-caps, conversation lookup with epoch fencing, compare-and-set re-placement, idle-timer slide) is a single
EVALSHA on the request path. Times come from the server's clock (`TIME`), so registries on different machines agree
on expiry without synchronised clocks, and the server enforces it: a session's hash carries its expiry
(`PEXPIREAT`), so an expired session is gone for every reader even before a sweeper notices. The sweeper's index
(`exp`, a sorted set of expiry times) and the per-session set of workers outlive the hash, so the workers that held
state are still told to drop it.

Keys (all under `sessions.store_key_prefix`, default `ark:`): `workers` (names), `w:<name>` (address, models,
capacity, incarnation, epoch), `w:<name>:lease` (TTL = lease), `w:<name>:load` (conversations placed on the current
incarnation, scored by expiry), `w:<name>:drops` (sessions to drop, handed over at renewal), `s:<id>` (a session,
TTL = idle timeout capped by the maximum age), `s:<id>:w` (workers that held its conversations), `owners` (id → key
hash), `exp` / `lru` / `k:<key hash>` (sorted sets by expiry, by last use, and per key by last use: the caps),
`c:<key hash>:<model>:<conversation key>` (worker and epoch of a conversation; TTL = idle timeout), `lease:<name>`.

Scripts touch keys they compute themselves, which a single primary (with replicas or Sentinel) allows; Redis
Cluster does not, and is not supported.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.common.config import SessionsConfig
from services.common.errors import UnavailableError
from services.sessions import metrics
from services.sessions.store import (
    ConversationPlacement,
    EndedSession,
    PlaceResult,
    SessionRecord,
    SessionStore,
    WorkerRecord,
    no_worker,
)

log = logging.getLogger(__name__)

# Shared by every script: the server's time in milliseconds, and how a session ends.
_PRELUDE = """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function load(name)
  redis.call('ZREMRANGEBYSCORE', P .. 'w:' .. name .. ':load', '-inf', now)
  return redis.call('ZCARD', P .. 'w:' .. name .. ':load')
end

local function end_session(id)
  local owner = redis.call('HGET', P .. 'owners', id)
  redis.call('HDEL', P .. 'owners', id)
  redis.call('ZREM', P .. 'exp', id)
  redis.call('ZREM', P .. 'lru', id)
  if owner then redis.call('ZREM', P .. 'k:' .. owner, id) end
  redis.call('DEL', P .. 's:' .. id)
  local names = redis.call('SMEMBERS', P .. 's:' .. id .. ':w')
  redis.call('DEL', P .. 's:' .. id .. ':w')
  local out = {id}
  for _, name in ipairs(names) do
    redis.call('SADD', P .. 'w:' .. name .. ':drops', id)
    out[#out + 1] = name
    out[#out + 1] = redis.call('HGET', P .. 'w:' .. name, 'address') or ''
  end
  return out
end
"""

# ARGV: prefix, name, address, models (newline-separated), capacity, incarnation, lease ms, record ms
_RENEW = """
local name = ARGV[2]
local wk = P .. 'w:' .. name
local epoch = tonumber(redis.call('HGET', wk, 'epoch') or '0')
if redis.call('HGET', wk, 'incarnation') ~= ARGV[6] then
  -- A new process: its predecessor's conversations died with it.
  epoch = redis.call('HINCRBY', wk, 'epoch', 1)
  redis.call('DEL', wk .. ':load')
end
redis.call('HSET', wk, 'address', ARGV[3], 'models', ARGV[4], 'capacity', ARGV[5], 'incarnation', ARGV[6])
-- The record (and its epoch) outlives every placement made on it, so a name that comes back is fenced too.
redis.call('PEXPIRE', wk, ARGV[8])
redis.call('SADD', P .. 'workers', name)
redis.call('SET', wk .. ':lease', ARGV[6], 'PX', ARGV[7])
local drops = redis.call('SMEMBERS', wk .. ':drops')
redis.call('DEL', wk .. ':drops')
return {epoch, now + tonumber(ARGV[7]), load(name), drops}
"""

# ARGV: prefix, model ('' for all)
_WORKERS = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', P .. 'workers')) do
  local ttl = redis.call('PTTL', P .. 'w:' .. name .. ':lease')
  local h = redis.call('HMGET', P .. 'w:' .. name, 'address', 'models', 'capacity', 'epoch')
  local serves = ARGV[2] == '' or string.find('\\n' .. h[2] .. '\\n', '\\n' .. ARGV[2] .. '\\n', 1, true)
  if ttl > 0 and h[1] and serves then
    out[#out + 1] = {name, h[1], h[2], tonumber(h[3]), tonumber(h[4]), now + ttl, load(name)}
  end
end
return out
"""

# ARGV: prefix, key hash, model, session id, conversation key, new session id, failed worker, idle ms, max age ms,
# per-key cap, global cap, the soonest workers' addresses (newline-separated)
_PLACE = """
local key, model, sid, ckey, new_sid, failed = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local idle, max_age = tonumber(ARGV[8]), tonumber(ARGV[9])
local cap_key, cap_total = tonumber(ARGV[10]), tonumber(ARGV[11])
local soonest = ARGV[12]

-- Live workers serving the model; nothing is written before we know there is one.
local live, count = {}, 0
for _, name in ipairs(redis.call('SMEMBERS', P .. 'workers')) do
  local ttl = redis.call('PTTL', P .. 'w:' .. name .. ':lease')
  local h = redis.call('HMGET', P .. 'w:' .. name, 'address', 'models', 'capacity', 'epoch')
  if ttl > 0 and h[1] and string.find('\\n' .. h[2] .. '\\n', '\\n' .. model .. '\\n', 1, true) then
    live[name] = {h[1], h[2], tonumber(h[3]), tonumber(h[4]), now + ttl}
    count = count + 1
  end
end
if count == 0 then return {'no_worker'} end

-- The session: resumed when it exists and belongs to the key (the server expires it), else created within caps.
local ended = {}
local created, smodel = nil, model
if sid ~= '' then
  local h = redis.call('HMGET', P .. 's:' .. sid, 'key', 'created', 'model')
  if h[1] == key then created, smodel = tonumber(h[2]), h[3] end
end
if created and failed ~= '' then
  ended[#ended + 1] = end_session(sid)
  created, smodel = nil, model
end
local is_new = 0
if not created then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, 16)) do
    ended[#ended + 1] = end_session(id)
  end
  while redis.call('ZCARD', P .. 'k:' .. key) >= cap_key do
    ended[#ended + 1] = end_session(redis.call('ZRANGE', P .. 'k:' .. key, 0, 0)[1])
  end
  while redis.call('ZCARD', P .. 'lru') >= cap_total do
    ended[#ended + 1] = end_session(redis.call('ZRANGE', P .. 'lru', 0, 0)[1])
  end
  sid, created, is_new = new_sid, now, 1
  redis.call('HSET', P .. 's:' .. sid, 'key', key, 'model', model, 'created', now)
  redis.call('HSET', P .. 'owners', sid, key)
end
local expires = math.min(now + idle, created + max_age)

-- The conversation: kept on its worker while that incarnation lives (compare-and-set: a conversation another
-- registry already moved off a failed worker stays where it went), else the least loaded live worker among the
-- soonest (the caller's view of which starts it soonest), or among all when none of those is live.
local ck = P .. 'c:' .. key .. ':' .. model .. ':' .. ckey
local c = redis.call('HMGET', ck, 'worker', 'epoch')
local wname, placed_now = nil, 0
if c[1] and live[c[1]] and tonumber(c[2]) == live[c[1]][4] and c[1] ~= failed then
  wname = c[1]
else
  local function eligible(name) return name ~= failed or count == 1 end
  local function soon(w) return string.find('\\n' .. soonest .. '\\n', '\\n' .. w[1] .. '\\n', 1, true) end
  local any_soon = false
  for name, w in pairs(live) do
    if soonest ~= '' and eligible(name) and soon(w) then any_soon = true end
  end
  local best = nil
  for name, w in pairs(live) do
    if eligible(name) and (not any_soon or soon(w)) then
      local n = load(name)
      local score = {n / math.max(1, w[3]), n, name}
      if not best or score[1] < best[1] or (score[1] == best[1] and (score[2] < best[2]
          or (score[2] == best[2] and score[3] < best[3]))) then
        best = score
      end
    end
  end
  wname, placed_now = best[3], 1
  if c[1] then redis.call('ZREM', P .. 'w:' .. c[1] .. ':load', ck) end
  redis.call('HSET', ck, 'worker', wname, 'epoch', live[wname][4])
end
local w = live[wname]
redis.call('PEXPIRE', ck, idle)
redis.call('ZADD', P .. 'w:' .. wname .. ':load', now + idle, ck)

redis.call('HSET', P .. 's:' .. sid, 'last', now, 'worker', wname, 'address', w[1])
redis.call('PEXPIREAT', P .. 's:' .. sid, expires)
redis.call('SADD', P .. 's:' .. sid .. ':w', wname)
redis.call('PEXPIREAT', P .. 's:' .. sid .. ':w', created + max_age + 3600000)
redis.call('ZADD', P .. 'exp', expires, sid)
redis.call('ZADD', P .. 'lru', now, sid)
redis.call('ZADD', P .. 'k:' .. key, now, sid)
return {'ok', sid, is_new, smodel, created, now, expires,
        wname, w[1], w[2], w[3], w[4], w[5], load(wname), placed_now, ended}
"""

# ARGV: prefix, session id, key hash, idle ms, max age ms
_GET = """
local sid = ARGV[2]
local h = redis.call('HMGET', P .. 's:' .. sid, 'key', 'model', 'created', 'worker', 'address')
if h[1] ~= ARGV[3] then return {} end
local created = tonumber(h[3])
local expires = math.min(now + tonumber(ARGV[4]), created + tonumber(ARGV[5]))
redis.call('HSET', P .. 's:' .. sid, 'last', now)
redis.call('PEXPIREAT', P .. 's:' .. sid, expires)
redis.call('ZADD', P .. 'exp', expires, sid)
redis.call('ZADD', P .. 'lru', now, sid)
redis.call('ZADD', P .. 'k:' .. h[1], now, sid)
return {h[2], created, now, expires, h[4] or '', h[5] or ''}
"""

# ARGV: prefix, session id, key hash
_END = """
if redis.call('HGET', P .. 's:' .. ARGV[2], 'key') ~= ARGV[3] then return {} end
return end_session(ARGV[2])
"""

# ARGV: prefix, limit
_END_EXPIRED = """
-- Workers whose lease is gone leave the set every placement scans (pods come and go under new names); their record
-- stays, so a worker that returns under the same name still gets a new epoch.
for _, name in ipairs(redis.call('SMEMBERS', P .. 'workers')) do
  if redis.call('EXISTS', P .. 'w:' .. name .. ':lease') == 0 then redis.call('SREM', P .. 'workers', name) end
end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  out[#out + 1] = end_session(id)
end
return out
"""

# ARGV: prefix, lease name, holder, ms
_HOLD = """
local k = P .. 'lease:' .. ARGV[2]
local current = redis.call('GET', k)
if current and current ~= ARGV[3] then return 0 end
redis.call('SET', k, ARGV[3], 'PX', ARGV[4])
return 1
"""


def _ended(raw: list[Any]) -> EndedSession:
    sid, rest = raw[0], raw[1:]
    return EndedSession(sid, tuple(sorted(zip(rest[0::2], rest[1::2], strict=True))))


class RedisSessionStore(SessionStore):
    """`sessions.store: redis://host:port/db` (also rediss:// and unix://)."""

    def __init__(self, policy: SessionsConfig) -> None:
        super().__init__(policy)
        # Short socket timeouts: the edge waits `registry_timeout_seconds` in all, and serves statelessly after.
        timeout = max(0.05, policy.registry_timeout_seconds / 2)
        self._client = redis.from_url(
            policy.store,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry covers a pooled connection the server closed (a restart); more would only make
            # the edge wait past its own timeout.
            retry=Retry(NoBackoff(), 1),
        )
        self._prefix = policy.store_key_prefix
        self._up = True

        def script(body: str):
            return self._client.register_script(_PRELUDE + body)

        self._renew, self._workers, self._place = script(_RENEW), script(_WORKERS), script(_PLACE)
        self._get, self._end, self._end_expired, self._hold = (
            script(_GET),
            script(_END),
            script(_END_EXPIRED),
            script(_HOLD),
        )

    async def _run(self, script, *args: Any) -> Any:
        """Run a script; a store failure becomes UnavailableError (the edge then serves statelessly), counted and
        logged once per outage."""
        try:
            result = await script(args=[self._prefix, *args])
        except RedisError as exc:
            metrics.STORE_ERRORS.inc()
            if self._up:
                self._up = False
                metrics.STORE_UP.set(0)
                log.warning("session store unreachable (%s): requests are served statelessly until it returns", exc)
            raise UnavailableError("The session store is unavailable.") from None
        if not self._up:
            self._up = True
            metrics.STORE_UP.set(1)
            log.info("session store reachable again: sessions resume")
        return result

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    async def renew_worker(self, name, address, models, capacity, incarnation, lease_seconds):
        lease_ms = int(lease_seconds * 1000)
        record_ms = (self.policy.max_age_seconds + 3600) * 1000 + lease_ms
        epoch, expires_ms, placed, drops = await self._run(
            self._renew, name, address, "\n".join(models), capacity, incarnation, lease_ms, record_ms
        )
        record = WorkerRecord(name, address, tuple(models), capacity, epoch, expires_ms / 1000, placed)
        return record, sorted(drops)

    async def live_workers(self, model=""):
        rows = await self._run(self._workers, model)
        workers = [
            WorkerRecord(name, address, tuple(models.split("\n")), capacity, epoch, expires_ms / 1000, placed)
            for name, address, models, capacity, epoch, expires_ms, placed in rows
        ]
        return sorted(workers, key=lambda w: w.name)

    async def place(
        self, api_key_hash, model, session_id, conversation_key, *, new_session_id, failed_worker="", soonest=()
    ):
        p = self.policy
        reply = await self._run(
            self._place,
            api_key_hash,
            model,
            session_id,
            conversation_key,
            new_session_id,
            failed_worker,
            p.idle_timeout_seconds * 1000,
            p.max_age_seconds * 1000,
            p.max_per_api_key,
            p.max_total,
            "\n".join(soonest),
        )
        if reply[0] == "no_worker":
            raise no_worker(model)
        _, sid, is_new, smodel, created, last, expires, name, address, models, capacity, epoch, lease, placed = reply[
            :14
        ]
        placed_now, ended = reply[14], reply[15]
        worker = WorkerRecord(name, address, tuple(models.split("\n")), capacity, epoch, lease / 1000, placed)
        session = SessionRecord(sid, api_key_hash, smodel, name, address, created / 1000, last / 1000, expires / 1000)
        return PlaceResult(
            ConversationPlacement(session, bool(is_new), worker, bool(placed_now)), list(map(_ended, ended))
        )

    async def get_session(self, session_id, api_key_hash):
        p = self.policy
        reply = await self._run(
            self._get, session_id, api_key_hash, p.idle_timeout_seconds * 1000, p.max_age_seconds * 1000
        )
        if not reply:
            return None
        model, created, last, expires, worker, address = reply
        return SessionRecord(
            session_id, api_key_hash, model, worker, address, created / 1000, last / 1000, expires / 1000
        )

    async def end_session(self, session_id, api_key_hash):
        reply = await self._run(self._end, session_id, api_key_hash)
        return _ended(reply) if reply else None

    async def end_expired(self, limit=256):
        return [_ended(r) for r in await self._run(self._end_expired, limit)]

    async def ack_drop(self, worker_name, session_id):
        # On failure the worker gets the drop again at renewal; dropping twice is harmless.
        with contextlib.suppress(RedisError):
            await self._client.srem(f"{self._prefix}w:{worker_name}:drops", session_id)

    async def hold_lease(self, name, holder, seconds):
        return bool(await self._run(self._hold, name, holder, int(seconds * 1000)))
