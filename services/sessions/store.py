"""Where the registry keeps sessions, conversation placements and worker leases.

One contract, two implementations: `InMemorySessionStore` (the default: one registry process, nothing to install)
and `RedisSessionStore` (services/sessions/redis_store.py: several registries share a Redis-protocol server such as
Valkey). Every operation that decides something is atomic in the store, so registries can be stateless over it:

- `place` validates or creates the session (caps evict the least recently used, per key and globally), slides its
  idle expiry, and returns the conversation's worker: the recorded one while that worker's lease is live and its
  epoch unchanged, otherwise the least loaded live worker serving the model (compare-and-set: a placement another
  registry already moved off a failed worker is kept, not moved twice). One call, one store round trip.
- A worker's lease is renewed with its incarnation (a random id per process start); a new incarnation bumps the
  worker's epoch, and a placement recorded under an older epoch is never trusted (its state died with the process).
- Ending a session (expiry, deletion, eviction, re-placement) records a pending drop for every worker that held one
  of its conversations, atomically with the end. The registry then tells the workers and acknowledges each delivered
  drop; whatever was not delivered reaches the worker with its next lease renewal, from any registry.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common.config import SessionsConfig
from services.common.errors import UnavailableError


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A chat worker as the store knows it."""

    name: str
    address: str
    models: tuple[str, ...]
    session_capacity: int
    # Bumped on every (re)start of the worker process (a new incarnation).
    epoch: int
    lease_expires_at: float
    # Live conversations placed on this incarnation.
    placed: int = 0


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session: a namespace of conversations bound to the API key that created it."""

    id: str
    api_key_hash: str
    model: str
    # The worker of the session's most recent request.
    worker_name: str
    worker_address: str
    created_at: float
    last_used_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class ConversationPlacement:
    """The answer to `place`: the session to use and the worker holding (or about to hold) the conversation."""

    session: SessionRecord
    session_is_new: bool
    worker: WorkerRecord
    # True when this call chose the worker (first turn, or the previous worker or incarnation is gone).
    placed_now: bool


@dataclass(frozen=True, slots=True)
class EndedSession:
    """A session that just ended, and the workers (name, address) that may hold state of it."""

    id: str
    workers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class PlaceResult:
    placement: ConversationPlacement
    # Sessions ended to make room (caps), because they expired, or because their worker failed.
    ended: list[EndedSession] = field(default_factory=list)


def no_worker(model: str) -> UnavailableError:
    return UnavailableError(f"No live chat worker serves {model!r}.")


class SessionStore(ABC):
    """The registry's state. Times are seconds since the epoch, taken from the store's own clock."""

    def __init__(self, policy: SessionsConfig) -> None:
        self.policy = policy

    @abstractmethod
    async def renew_worker(
        self,
        name: str,
        address: str,
        models: tuple[str, ...],
        capacity: int,
        incarnation: str,
        lease_seconds: float,
    ) -> tuple[WorkerRecord, list[str]]:
        """Register or renew a worker; returns its record and the session ids it must drop (handed over once)."""

    @abstractmethod
    async def live_workers(self, model: str = "") -> list[WorkerRecord]:
        """Workers with a live lease (serving `model`, if given), with their placed conversation counts."""

    @abstractmethod
    async def place(
        self,
        api_key_hash: str,
        model: str,
        session_id: str,
        conversation_key: str,
        *,
        new_session_id: str,
        failed_worker: str = "",
        soonest: Sequence[str] = (),
    ) -> PlaceResult:
        """Resume `session_id` (when it exists, belongs to the key and has not expired) or create `new_session_id`,
        and place the conversation. `failed_worker`: the caller could not reach it; the session is replaced by a
        new one and the conversation moves off that worker unless it already has. A conversation placed now goes to
        a live worker whose address is in `soonest` (the caller's view of which would start it soonest) when there
        is one, the least loaded of them by conversations. Raises UnavailableError when no live worker serves the
        model (and then changes nothing)."""

    @abstractmethod
    async def get_session(self, session_id: str, api_key_hash: str) -> SessionRecord | None:
        """The session if it is live and owned by the key (its idle timer restarts); None otherwise."""

    @abstractmethod
    async def end_session(self, session_id: str, api_key_hash: str) -> EndedSession | None:
        """End a live session owned by the key; None when there is none."""

    @abstractmethod
    async def end_expired(self, limit: int = 256) -> list[EndedSession]:
        """End up to `limit` sessions whose idle timeout or maximum age has passed."""

    @abstractmethod
    async def ack_drop(self, worker_name: str, session_id: str) -> None:
        """The worker confirmed it dropped the session's state: no need to tell it again at renewal."""

    @abstractmethod
    async def hold_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take or extend a named lease (e.g. the sweeper's leadership); False while another holder has it."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise when the store cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


def open_store(policy: SessionsConfig) -> SessionStore:
    """The store named by `sessions.store`: `memory` or a redis://, rediss:// or unix:// URL."""
    if policy.store == "memory":
        return InMemorySessionStore(policy)
    from services.sessions.redis_store import RedisSessionStore  # only deployments that use it need redis-py

    return RedisSessionStore(policy)


# -- in memory ------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Worker:
    address: str
    models: tuple[str, ...]
    capacity: int
    incarnation: str
    epoch: int
    lease_expires_at: float


@dataclass(slots=True)
class _Session:
    api_key_hash: str
    model: str
    created_at: float
    last_used_at: float
    worker_name: str = ""
    worker_address: str = ""
    workers: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Conversation:
    worker: str
    epoch: int
    expires_at: float


class InMemorySessionStore(SessionStore):
    """One process's memory: what `make run` uses. Operations are atomic because nothing awaits inside them."""

    def __init__(self, policy: SessionsConfig, clock: Callable[[], float] = time.time) -> None:
        super().__init__(policy)
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._sessions: dict[str, _Session] = {}
        self._conversations: dict[tuple[str, str, str], _Conversation] = {}
        self._drops: dict[str, set[str]] = {}
        self._leases: dict[str, tuple[str, float]] = {}

    # -- workers

    async def renew_worker(self, name, address, models, capacity, incarnation, lease_seconds):
        now = self._clock()
        known = self._workers.get(name)
        epoch = known.epoch if known else 0
        if known is None or known.incarnation != incarnation:
            epoch += 1
        self._workers[name] = _Worker(address, tuple(models), capacity, incarnation, epoch, now + lease_seconds)
        dropped = sorted(self._drops.pop(name, set()))
        return self._record(name, now), dropped

    async def live_workers(self, model=""):
        now = self._clock()
        return [self._record(n, now) for n in sorted(self._live(model, now))]

    def _live(self, model: str, now: float) -> list[str]:
        return [n for n, w in self._workers.items() if w.lease_expires_at > now and (not model or model in w.models)]

    def _load(self, name: str, now: float) -> int:
        epoch = self._workers[name].epoch
        return sum(
            1 for c in self._conversations.values() if c.worker == name and c.epoch == epoch and c.expires_at > now
        )

    def _record(self, name: str, now: float) -> WorkerRecord:
        w = self._workers[name]
        return WorkerRecord(name, w.address, w.models, w.capacity, w.epoch, w.lease_expires_at, self._load(name, now))

    # -- sessions

    def _expires_at(self, s: _Session) -> float:
        return min(s.last_used_at + self.policy.idle_timeout_seconds, s.created_at + self.policy.max_age_seconds)

    def _live_session(self, session_id: str, api_key_hash: str, now: float) -> _Session | None:
        s = self._sessions.get(session_id)
        if s is None or s.api_key_hash != api_key_hash or self._expires_at(s) <= now:
            return None
        return s

    def _session_record(self, session_id: str, s: _Session) -> SessionRecord:
        return SessionRecord(
            session_id,
            s.api_key_hash,
            s.model,
            s.worker_name,
            s.worker_address,
            s.created_at,
            s.last_used_at,
            self._expires_at(s),
        )

    def _end(self, session_id: str) -> EndedSession | None:
        s = self._sessions.pop(session_id, None)
        if s is None:
            return None
        for name in s.workers:
            self._drops.setdefault(name, set()).add(session_id)
        workers = tuple(sorted((n, self._workers[n].address) for n in s.workers if n in self._workers))
        return EndedSession(session_id, workers)

    async def place(
        self, api_key_hash, model, session_id, conversation_key, *, new_session_id, failed_worker="", soonest=()
    ):
        now = self._clock()
        live = self._live(model, now)
        if not live:
            raise no_worker(model)
        ended: list[EndedSession] = []
        session = self._live_session(session_id, api_key_hash, now) if session_id else None
        if session is not None and failed_worker:
            ended.append(self._end(session_id))  # type: ignore[arg-type]
            session = None
        is_new = session is None
        if session is None:
            ended += self._make_room(api_key_hash, now)
            session_id = new_session_id
            session = self._sessions[session_id] = _Session(api_key_hash, model, now, now)
        key = (api_key_hash, model, conversation_key)
        conversation = self._conversations.get(key)
        placed_now = not (
            conversation is not None
            and conversation.expires_at > now
            and conversation.worker in live
            and conversation.worker != failed_worker
            and self._workers[conversation.worker].epoch == conversation.epoch
        )
        if placed_now:
            candidates = [n for n in live if n != failed_worker] or live
            candidates = [n for n in candidates if self._workers[n].address in soonest] or candidates
            name = min(candidates, key=lambda n: _load_order(n, self._load(n, now), self._workers[n].capacity))
            conversation = _Conversation(name, self._workers[name].epoch, 0.0)
        assert conversation is not None
        conversation.expires_at = now + self.policy.idle_timeout_seconds
        self._conversations[key] = conversation
        worker = self._workers[conversation.worker]
        session.last_used_at = now
        session.worker_name, session.worker_address = conversation.worker, worker.address
        session.workers.add(conversation.worker)
        placement = ConversationPlacement(
            self._session_record(session_id, session), is_new, self._record(conversation.worker, now), placed_now
        )
        return PlaceResult(placement, [e for e in ended if e is not None])

    def _make_room(self, api_key_hash: str, now: float) -> list[EndedSession]:
        ended = [self._end(sid) for sid, s in list(self._sessions.items()) if self._expires_at(s) <= now]
        by_age = sorted(self._sessions, key=lambda sid: self._sessions[sid].last_used_at)
        mine = [sid for sid in by_age if self._sessions[sid].api_key_hash == api_key_hash]
        while len(mine) >= self.policy.max_per_api_key:
            victim = mine.pop(0)
            by_age.remove(victim)
            ended.append(self._end(victim))
        while len(by_age) >= self.policy.max_total:
            ended.append(self._end(by_age.pop(0)))
        return [e for e in ended if e is not None]

    async def get_session(self, session_id, api_key_hash):
        now = self._clock()
        s = self._live_session(session_id, api_key_hash, now)
        if s is None:
            return None
        s.last_used_at = now
        return self._session_record(session_id, s)

    async def end_session(self, session_id, api_key_hash):
        if self._live_session(session_id, api_key_hash, self._clock()) is None:
            return None
        return self._end(session_id)

    async def end_expired(self, limit=256):
        now = self._clock()
        # Housekeeping rides on the sweep: expired placements, and workers gone for longer than any placement lives.
        self._conversations = {k: c for k, c in self._conversations.items() if c.expires_at > now}
        forgotten = now - self.policy.max_age_seconds - 3600
        self._workers = {n: w for n, w in self._workers.items() if w.lease_expires_at > forgotten}
        self._drops = {n: d for n, d in self._drops.items() if n in self._workers}
        expired = [sid for sid, s in self._sessions.items() if self._expires_at(s) <= now][:limit]
        return [e for e in map(self._end, expired) if e is not None]

    async def ack_drop(self, worker_name, session_id):
        self._drops.get(worker_name, set()).discard(session_id)

    async def ping(self):
        pass  # always reachable: it is this process

    async def close(self):
        pass

    async def hold_lease(self, name, holder, seconds):
        now = self._clock()
        current = self._leases.get(name)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._leases[name] = (holder, now + seconds)
        return True


def _load_order(name: str, placed: int, capacity: int) -> tuple[float, int, str]:
    """Least loaded relative to capacity first; ties broken by name for a stable choice."""
    return (placed / max(1, capacity), placed, name)
