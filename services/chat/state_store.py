"""Every conversation state of one model on a chat worker, in one index: resident, in host memory, or on disk.

A session (cookie) is a namespace of many conversations, so a worker keeps many conversation states per API key.
Each is one `StateEntry` whose `tier` says where it is:
- resident: its cells live in one of the engine's resident contexts (a sequence of llama.cpp's shared KV cache);
- host: the engine exported them (`export_state`) and the bytes are kept in memory;
- disk: the bytes are in a private file (services/chat/state_files.py).
A state lost from every tier costs a recompute, never an error: every failure here (a full disk, a vanished file,
a blob that does not load) is logged and treated as "not found".

A request is matched by content (`best_match`) against every state of its API key — the worker's own raw
transcript tokens included — and continues the one sharing the longest token prefix; the conversation key the
edge computes breaks ties, then the faster tier, then recency. States never serve another API key, whatever the
content. A newly saved state supersedes the key's saved states whose tokens are a prefix of its own (it serves
every request they would, and more) and the state saved earlier under the same conversation key.

Room is made by one cascade, resident → host → disk → gone, with one fair-share rule in every tier (`_victim`):
when a tier is full, the state that leaves is the least recent one of an API key holding more than `key_share` of
the tier (then: more than an equal split of it), so a key that floods the worker pushes out its own states first and
the other keys, while within their share, pay at most a move down a tier. A key alone on the worker may use the
whole tier. Resident contexts are counted in contexts, host and disk in bytes.

The engine may run out of KV cells while resident conversations sit idle: it then calls `spill` (registered once,
`ChatEngine.on_memory_full`) on its own thread, and the least recent idle resident state (by the same rule) is
exported and saved to the host tier before its cells are cleared, rather than dropped.

Threading: one lock guards the index. A turn checks out on a worker thread in three phases: decide and claim (lock
held), export / read / import (no lock: they wait for the engine's thread, which may itself need the lock to spill),
commit (lock held). Turns check out at once: what one claims (its state, its context, the state it saves out of that
context) is marked busy or taken out of its tier in the first phase, so no other turn nor spill touches it, and the
engine's thread serves every waiting turn's export and import between two steps: a burst of new conversations
waited a step per turn when they took turns. The engine's thread takes the lock only in `spill`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from services.chat.domain import Message
from services.chat.engines.base import ChatEngine
from services.chat.metrics import RESTORE_SECONDS, TIER_BYTES, TIER_ENTRIES, TIER_EVICTIONS, TIER_HITS
from services.chat.prompts import Prompts
from services.chat.state_files import StateFiles
from services.chat.transcript import Transcript, shared_prefix
from services.common.config import SessionsConfig

log = logging.getLogger(__name__)

# Another conversation's state is reused (and first saved) only for a prefix at least this long, such as a shared
# system prompt; a few template tokens in common are cheaper to recompute than a state is to save.
MIN_SHARED_TOKENS = 32

_NO_TOKENS = np.zeros(0, dtype=np.int64)


class Tier(StrEnum):
    RESIDENT = "resident"
    HOST = "host"
    DISK = "disk"


_BELOW = {Tier.RESIDENT: Tier.HOST, Tier.HOST: Tier.DISK, Tier.DISK: None}
_SPEED = {Tier.DISK: 0, Tier.HOST: 1, Tier.RESIDENT: 2}  # ties go to the state that is quickest to continue


@dataclass(slots=True)
class _Context:
    """One of the engine's resident contexts and the state it holds."""

    context: Any
    entry: StateEntry | None = None
    busy: bool = False  # a turn runs in it, or the store is moving its state: no other turn nor spill touches it


@dataclass(eq=False, slots=True)
class StateEntry:
    """One conversation state of one API key, wherever it is."""

    entry_id: str  # uuid4 hex, made here
    api_key_hash: str
    session_id: str  # "" when the request carried no session
    conversation_key: str  # "" when the caller has none
    idle_timeout: float = 0.0  # 0: never idle-expired here (the registry still ends its session)
    last_used: float = 0.0
    tier: Tier | None = None  # None: in no tier (being moved, or gone)
    transcript: Transcript | None = None  # the last completed turn, for continuing from its raw tokens
    tokens: np.ndarray = field(default_factory=lambda: _NO_TOKENS)  # what saved bytes cover (resident: the context)
    size: int = 0  # bytes of the saved state
    held: _Context | None = None  # resident
    blob: bytes | bytearray | None = None  # host
    path: Path | None = None  # disk
    cost: int = 0  # what it counts for in its tier's accounting (1 context, or its bytes)


@dataclass(slots=True)
class Checkout:
    """The context a turn runs in (None: every context is busy, so the turn runs without keeping its state), with
    its prompt and the tier the reused state came from ("" when nothing was reused)."""

    context: Any
    entry: StateEntry | None
    prompt_text: str
    tokens: list[int]
    tier: str
    released: bool = False


class _Wanted:
    """A request's prompt as each candidate state would continue it: from its transcript's raw tokens when the
    messages carry that turn back, else rendered afresh (computed once)."""

    def __init__(self, prompts: Prompts | None, messages: Sequence[Message], plain: list[int] | None = None) -> None:
        self._prompts = prompts
        self._messages = messages
        self._plain = plain
        self._continued: dict[int, list[int] | None] = {}

    @property
    def plain(self) -> list[int]:
        if self._plain is None:
            assert self._prompts is not None
            self._plain = self._prompts.encode(self._messages)
        return self._plain

    def tokens_for(self, transcript: Transcript | None) -> tuple[list[int], bool]:
        """The prompt for a state with this transcript, and whether it continues the transcript."""
        if transcript is None or self._prompts is None:
            return self.plain, False
        key = id(transcript)
        if key not in self._continued:
            self._continued[key] = self._prompts.continue_from(transcript, self._messages)
        tokens = self._continued[key]
        return (tokens, True) if tokens is not None else (self.plain, False)


@dataclass(slots=True)
class _Match:
    entry: StateEntry
    tokens: list[int]
    matched: int
    held: int  # tokens the state covers
    same: bool  # same conversation key


class ConversationStore:
    """The conversation states of one model on one worker."""

    def __init__(
        self,
        engine: ChatEngine,
        prompts: Prompts | None = None,
        *,
        host_bytes: int = 0,
        disk_bytes: int = 0,
        key_share: float = 0.5,
        disk_dir: str | Path | None = None,
        model: str = "",
        contexts: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`contexts`: how many of the engine's resident contexts the store takes (default: all; 0 for a store of
        saved states only, such as a benchmark's)."""
        if host_bytes < 0 or disk_bytes < 0:
            raise ValueError("tier sizes must not be negative")
        if not 0 < key_share <= 1:
            raise ValueError("key_share must be in (0, 1]")
        self._engine = engine
        self._prompts = prompts if prompts is not None else Prompts(engine)
        self._model = model or engine.model_id
        self._clock = clock
        self._key_share = key_share
        count = engine.context_slots if contexts is None else contexts
        self._contexts = [_Context(engine.new_context()) for _ in range(count)]
        self._capacity = {Tier.RESIDENT: len(self._contexts), Tier.HOST: host_bytes, Tier.DISK: disk_bytes}
        self._used = {tier: 0 for tier in Tier}
        self._used_by: dict[Tier, dict[str, int]] = {tier: {} for tier in Tier}
        self._count = {tier: 0 for tier in Tier}
        self._entries: OrderedDict[str, StateEntry] = OrderedDict()  # every state, least recently used first
        self._lock = threading.RLock()
        self._files = StateFiles(disk_dir) if disk_bytes else None
        if self._contexts:
            engine.on_memory_full(self.spill)
        self._publish()

    @classmethod
    def from_config(
        cls, engine: ChatEngine, prompts: Prompts | None, sessions: SessionsConfig | None
    ) -> ConversationStore:
        """The store of one chat model, its tiers sized by the `sessions` section (None: sessions off, no tiers)."""
        if sessions is None:
            return cls(engine, prompts)
        mb = 1024 * 1024
        return cls(
            engine,
            prompts,
            host_bytes=int(sessions.host_cache_mb * mb),
            disk_bytes=int(sessions.disk_cache_mb * mb),
            key_share=sessions.key_share,
            disk_dir=sessions.disk_dir,
        )

    # -- status -----------------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Resident contexts."""
        return len(self._contexts)

    @property
    def resident(self) -> int:
        return self._used[Tier.RESIDENT]

    @property
    def directory(self) -> Path | None:
        """This store's own directory (None when the disk tier is off)."""
        return self._files.directory if self._files is not None else None

    def tier_of(self, entry_id: str) -> Tier | None:
        with self._lock:
            entry = self._entries.get(entry_id)
            return entry.tier if entry is not None else None

    def used_bytes(self, tier: Tier, api_key_hash: str | None = None) -> int:
        """Bytes held in a saved tier (contexts for the resident tier), in all or for one API key."""
        with self._lock:
            return self._used[tier] if api_key_hash is None else self._used_by[tier].get(api_key_hash, 0)

    def entries(self, api_key_hash: str | None = None, tier: Tier | None = None) -> list[StateEntry]:
        """The saved states (or those of one tier), least recently used first."""
        with self._lock:
            return [
                e
                for e in self._entries.values()
                if (e.tier is tier if tier is not None else e.tier in (Tier.HOST, Tier.DISK))
                and (api_key_hash is None or e.api_key_hash == api_key_hash)
            ]

    def __len__(self) -> int:
        """Saved states (host and disk)."""
        with self._lock:
            return self._count[Tier.HOST] + self._count[Tier.DISK]

    # -- a turn's context -------------------------------------------------------------------------------------------

    async def checkout(
        self,
        *,
        api_key_hash: str,
        session_id: str,
        conversation_key: str,
        idle_timeout: float,
        messages: Sequence[Message],
    ) -> Checkout:
        """The context to run a turn in, holding the best state of its key, and the prompt to run; `release` it
        when the turn's engine work is over."""
        return await asyncio.to_thread(
            self._checkout, api_key_hash, session_id, conversation_key, idle_timeout, messages
        )

    def _checkout(
        self, key: str, session_id: str, conversation: str, idle_timeout: float, messages: Sequence[Message]
    ) -> Checkout:
        self.expire_idle()
        prompt_text = self._prompts.render(messages)
        wanted = _Wanted(self._prompts, messages)
        with self._lock:
            transcripts = [e.transcript for e in self._entries.values() if e.api_key_hash == key]
        wanted.plain  # noqa: B018 - the costly part (rendering, tokenizing) outside the lock
        for transcript in transcripts:
            wanted.tokens_for(transcript)

        # 1. Decide and claim (lock held): the best state, the context to run in, a state to save out of it first.
        restore: tuple[Tier, bytes | bytearray | Path] | None = None
        with self._lock:
            best = self._best(key, conversation, wanted)
            tokens = best.tokens if best is not None else wanted.plain
            if best is not None and best.entry.held is not None:
                slot, victim = best.entry.held, None
                slot.busy = True
                if best.matched < best.held and not best.same:
                    victim = best.entry  # another conversation's state: saved first, its shared prefix reused
            else:
                slot, victim = self._claim(key)
                if slot is None:
                    return Checkout(None, None, prompt_text, tokens, "")
                if best is not None:
                    restore = self._take(best.entry)

        try:
            entry, tier = self._move_and_bind(key, session_id, conversation, idle_timeout, best, slot, victim, restore)
        except BaseException:
            with self._lock:  # never leave a context claimed, nor a state half moved, by a turn that will not run
                slot.busy = False
                if slot.entry is None:
                    self._engine.reset_context(slot.context)
                for moved in (victim, best.entry if best is not None else None):
                    if moved is not None and moved.tier is None:
                        self._entries.pop(moved.entry_id, None)
            raise
        return Checkout(slot.context, entry, prompt_text, tokens, tier)

    def _move_and_bind(
        self,
        key: str,
        session_id: str,
        conversation: str,
        idle_timeout: float,
        best: _Match | None,
        slot: _Context,
        victim: StateEntry | None,
        restore: tuple[Tier, bytes | bytearray | Path] | None,
    ) -> tuple[StateEntry, str]:
        """Phases 2 and 3 of a checkout: the entry bound to `slot` and the tier its state came from."""
        # 2. Move bytes (no lock: the engine's thread does the work, and may need the lock meanwhile).
        saved = self._export(victim, slot) if victim is not None else None
        tier = Tier.RESIDENT.value if best is not None and restore is None else ""
        if restore is not None:
            assert best is not None
            tier = self._load(best.entry, slot, *restore)
        elif best is None:
            self._engine.reset_context(slot.context)

        # 3. Commit (lock held).
        with self._lock:
            if victim is not None:
                self._retire(victim, saved)
            if best is None or best.entry is victim or best.entry.entry_id not in self._entries:
                if best is not None and best.entry is not victim:  # its session ended meanwhile
                    self._engine.reset_context(slot.context)
                    tier = ""
                entry = StateEntry(uuid.uuid4().hex, key, session_id, conversation)
                self._entries[entry.entry_id] = entry
            else:
                entry = best.entry
            self._bind(entry, slot, session_id, conversation, idle_timeout)
            self._publish()
        return entry, tier

    def complete(self, checkout: Checkout, transcript: Transcript | None) -> None:
        """The turn is done: its state now covers its transcript."""
        if checkout.entry is None:
            return
        with self._lock:
            checkout.entry.transcript = transcript
            self._touch(checkout.entry)

    def release(self, checkout: Checkout) -> None:
        """The turn's engine work is over (completed or not): its context may serve other turns again. Only the
        first call counts (the context may be another turn's by a later one)."""
        if checkout.released:
            return
        checkout.released = True
        with self._lock:
            for slot in self._contexts:
                if slot.context is checkout.context and slot.busy:
                    slot.busy = False
                    if slot.entry is None:  # dropped while it ran
                        self._engine.reset_context(slot.context)

    # -- matching ---------------------------------------------------------------------------------------------------

    def best_match(
        self, api_key_hash: str, tokens: Sequence[int], conversation_key: str = ""
    ) -> tuple[StateEntry, int] | None:
        """The state of the key a request with these prompt tokens would continue, and the tokens it shares."""
        with self._lock:
            best = self._best(api_key_hash, conversation_key, _Wanted(None, (), list(tokens)))
        return (best.entry, best.matched) if best is not None else None

    def _best(self, key: str, conversation: str, wanted: _Wanted) -> _Match | None:
        """Among the key's states not in use, the one sharing the longest token prefix with the request; ties go to
        the same conversation key, then the quickest tier, then the most recent. Lock held."""
        best: _Match | None = None
        best_rank: tuple = ()
        for order, entry in enumerate(self._entries.values()):
            if entry.api_key_hash != key or entry.tier is None or (entry.held is not None and entry.held.busy):
                continue
            tokens, continued = wanted.tokens_for(entry.transcript)
            held = self._engine.context_tokens(entry.held.context) if entry.held is not None else entry.tokens
            matched = shared_prefix(held, tokens)
            same = bool(conversation) and entry.conversation_key == conversation
            if not (matched >= MIN_SHARED_TOKENS or (matched and (same or continued))):
                continue  # a few template tokens in common: not worth saving another conversation's state for
            if entry.held is None and not (same or continued) and matched < len(held):
                continue  # restoring would take another conversation's saved state away from it
            rank = (matched, same, _SPEED[entry.tier], order)
            if best is None or rank > best_rank:
                best, best_rank = _Match(entry, tokens, matched, len(held), same), rank
        return best

    # -- room: one cascade, one fair-share rule ----------------------------------------------------------------------

    def _victim(
        self, tier: Tier, key: str, need: int, *, force: bool = False, with_cells: bool = False
    ) -> StateEntry | None:
        """The state to push out of `tier` so that `need` more of `key` fit (None: they fit, or none can leave).

        The least recent state of a key over its share goes first (the newcomer's need counted), then that of a key
        over an equal split of the tier, then the least recent of all. `force`: the tier must give one up anyway;
        `with_cells`: only resident states whose context holds cells."""
        capacity, used_by = self._capacity[tier], self._used_by[tier]
        if not force and self._used[tier] + need <= capacity:
            return None
        idle = [e for e in self._entries.values() if e.tier is tier and (e.held is None or not e.held.busy)]
        if with_cells:
            idle = [e for e in idle if e.held is not None and self._engine.context_tokens(e.held.context)]
        if not idle:
            return None

        def holds(owner: str) -> int:
            return used_by.get(owner, 0) + (need if owner == key else 0)

        quota = max(1, int(capacity * self._key_share))
        equal_split = capacity / max(1, len(set(used_by) | ({key} if key else set())))
        for limit in (quota, equal_split):
            for entry in idle:
                if holds(entry.api_key_hash) > limit:
                    return entry
        return idle[0]

    def _claim(self, key: str) -> tuple[_Context | None, StateEntry | None]:
        """A context for a turn of `key` (marked busy) and the state to save out of it first; (None, None) when
        every context is running a turn. Lock held."""
        for slot in self._contexts:
            if slot.entry is None and not slot.busy:
                slot.busy = True
                return slot, None
        victim = self._victim(Tier.RESIDENT, key, 1, force=True)
        if victim is None:
            return None, None
        assert victim.held is not None
        victim.held.busy = True
        return victim.held, victim

    def spill(self) -> bool:
        """Free one resident context's cells for the engine, which ran out of them: the least recent idle resident
        state (fair share first) is exported, saved to the host tier and its cells cleared. Called on the engine's
        thread, where export and clear run at once; False when no idle resident state holds cells."""
        with self._lock:
            victim = self._victim(Tier.RESIDENT, "", 0, force=True, with_cells=True)
            if victim is None:
                return False
            assert victim.held is not None
            context = victim.held.context
            saved = self._export(victim, victim.held)
            self._engine.reset_context(context)
            self._retire(victim, saved)
            self._publish()
            return True

    def _export(self, entry: StateEntry, slot: _Context) -> tuple[tuple[int, ...], bytes | bytearray] | None:
        """The tokens and bytes of a resident state (None: nothing worth keeping, or the engine cannot export)."""
        tokens = tuple(self._engine.context_tokens(slot.context))
        if not tokens:
            return None
        try:
            blob = self._engine.export_state(slot.context)
        except Exception:
            log.warning("cannot export a conversation state; it will be recomputed", exc_info=True)
            return None
        return (tokens, blob) if blob else None

    def _retire(self, entry: StateEntry, saved: tuple[tuple[int, ...], bytes | bytearray] | None) -> None:
        """A resident state leaves its context: saved down the tiers, or forgotten. Lock held."""
        if entry.held is not None:
            entry.held.entry = None
            entry.held = None
        self._set_tier(entry, None)
        if saved is None or entry.entry_id not in self._entries:
            self._entries.pop(entry.entry_id, None)
            return
        TIER_EVICTIONS.labels(self._model, Tier.RESIDENT).inc()
        self._save(entry, *saved)

    def _save(self, entry: StateEntry, tokens: Sequence[int], blob: bytes | bytearray) -> bool:
        """Keep a state's bytes (no copy: the caller must not change them), superseding the key's saved states
        it makes useless; False when no tier can hold it. Lock held."""
        entry.tokens = np.asarray(tokens, dtype=np.int64)
        entry.blob, entry.size = blob, len(blob)
        for old in list(self._entries.values()):
            if old is entry or old.api_key_hash != entry.api_key_hash or old.tier not in (Tier.HOST, Tier.DISK):
                continue
            n = len(old.tokens)
            same = bool(entry.conversation_key) and old.conversation_key == entry.conversation_key
            if same or (n <= len(entry.tokens) and shared_prefix(old.tokens, entry.tokens) == n):
                self._drop(old)
        if self._place(entry, Tier.HOST):
            return True
        self._entries.pop(entry.entry_id, None)
        return False

    def _place(self, entry: StateEntry, tier: Tier | None) -> bool:
        """Put a saved state in `tier` or the first one below that can hold it, pushing others down or out (the
        cascade); False: held nowhere. Lock held."""
        while tier is not None and entry.size > self._capacity[tier]:
            tier = _BELOW[tier]
        if tier is None:
            self._discard(entry)
            return False
        while (victim := self._victim(tier, entry.api_key_hash, entry.size)) is not None:
            self._set_tier(victim, None)
            TIER_EVICTIONS.labels(self._model, tier).inc()
            if not self._place(victim, _BELOW[tier]):
                self._entries.pop(victim.entry_id, None)
        if tier is Tier.DISK:
            assert self._files is not None and entry.blob is not None
            path = self._files.write(entry.blob)
            if path is None:
                self._discard(entry)
                return False
            entry.path, entry.blob = path, None
        self._set_tier(entry, tier)
        return True

    # -- restoring --------------------------------------------------------------------------------------------------

    def _take(self, entry: StateEntry) -> tuple[Tier, bytes | bytearray | Path]:
        """Take a saved state out of its tier (it stays indexed, in no tier, until bound or dropped). Lock held."""
        tier = entry.tier
        assert tier in (Tier.HOST, Tier.DISK)
        source = entry.blob if entry.blob is not None else entry.path
        assert source is not None
        self._set_tier(entry, None)
        entry.blob, entry.path = None, None
        return tier, source

    def _read(self, tier: Tier, source: bytes | bytearray | Path) -> bytes | bytearray | None:
        blob = StateFiles.take(source) if isinstance(source, Path) else source
        if blob is not None:
            TIER_HITS.labels(self._model, tier).inc()
        return blob

    def _load(self, entry: StateEntry, slot: _Context, tier: Tier, source: bytes | bytearray | Path) -> str:
        """Read a taken state and load it into a context; the tier it came from, or "" if it was lost (the
        context is then empty)."""
        start = time.perf_counter()
        blob = self._read(tier, source)
        loaded = False
        if blob is not None:
            try:
                loaded = self._engine.import_state(slot.context, blob, entry.tokens.tolist())
            except Exception:
                log.warning("cannot load saved conversation state %s; it will be recomputed", entry.entry_id)
        if not loaded:
            self._engine.reset_context(slot.context)
            entry.transcript = None  # lost: the prompt still continues its raw tokens, recomputed
            return ""
        RESTORE_SECONDS.labels(self._model, tier).observe(time.perf_counter() - start)
        return tier.value

    def take(self, entry_id: str) -> tuple[Tier, bytes | bytearray] | None:
        """Remove a saved state from the store and return it with the tier it came from (None: it is gone)."""
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is None or entry.tier not in (Tier.HOST, Tier.DISK):
                return None
            tier, source = self._take(entry)
            del self._entries[entry_id]
            self._publish()
        blob = self._read(tier, source)
        return (tier, blob) if blob is not None else None

    def restore(self, entry_id: str, load: Callable[[bytes | bytearray], object]) -> Tier | None:
        """`take` a saved state and hand it to `load` (which puts it into a context), timing both for the restore
        latency metric. None when the state is gone or `load` failed (raised, or returned False; logged)."""
        start = time.perf_counter()
        taken = self.take(entry_id)
        if taken is None:
            return None
        tier, blob = taken
        try:
            loaded = load(blob)
        except Exception:
            log.warning("cannot load saved conversation state %s; it will be recomputed", entry_id, exc_info=True)
            return None
        if loaded is False:
            return None
        RESTORE_SECONDS.labels(self._model, tier).observe(time.perf_counter() - start)
        return tier

    # -- saving directly (tools and tests: a state exported elsewhere) ----------------------------------------------

    def put(
        self,
        *,
        api_key_hash: str,
        session_id: str,
        conversation_key: str,
        tokens: Sequence[int],
        blob: bytes | bytearray,
    ) -> StateEntry | None:
        """Save a state's bytes as the most recent state; None when no tier can hold it."""
        entry = StateEntry(uuid.uuid4().hex, api_key_hash, session_id, conversation_key)
        with self._lock:
            self._entries[entry.entry_id] = entry
            self._touch(entry)
            kept = self._save(entry, tokens, blob)
            self._publish()
        return entry if kept else None

    # -- ending states ----------------------------------------------------------------------------------------------

    def drop(self, entry_id: str) -> bool:
        """Forget one state, in every tier (its file deleted)."""
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is not None:
                self._drop(entry)
                self._publish()
            return entry is not None

    def drop_session(self, session_id: str) -> int:
        """Forget every state of a session (expiry, DELETE), in every tier; returns how many. Does file I/O."""
        if not session_id:
            return 0  # "" marks states kept without a session: they belong to no session to end
        with self._lock:
            found = [e for e in self._entries.values() if e.session_id == session_id]
            for entry in found:
                self._drop(entry)
            self._publish()
            return len(found)

    def expire_idle(self) -> int:
        """Forget states idle past their timeout, in every tier; returns how many. Does file I/O."""
        now = self._clock()
        with self._lock:
            idle = [
                e
                for e in self._entries.values()
                if e.idle_timeout
                and now - e.last_used > e.idle_timeout
                and e.tier is not None
                and (e.held is None or not e.held.busy)
            ]
            for entry in idle:
                self._drop(entry)
            self._publish()
            return len(idle)

    def close(self) -> None:
        """Delete every saved state and this store's directory."""
        with self._lock:
            for entry in list(self._entries.values()):
                self._drop(entry)
            self._publish()
            if self._files is not None:
                self._files.close()
                self._files = None

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bookkeeping (lock held) ------------------------------------------------------------------------------------

    def _bind(self, entry: StateEntry, slot: _Context, session_id: str, conversation: str, idle: float) -> None:
        entry.session_id = session_id or entry.session_id
        entry.conversation_key = conversation or entry.conversation_key
        entry.idle_timeout = idle or entry.idle_timeout
        entry.transcript = None  # until this turn completes
        entry.tokens, entry.blob, entry.path = _NO_TOKENS, None, None
        entry.held, slot.entry = slot, entry
        self._set_tier(entry, Tier.RESIDENT)
        self._touch(entry)

    def _touch(self, entry: StateEntry) -> None:
        entry.last_used = self._clock()
        if entry.entry_id in self._entries:
            self._entries.move_to_end(entry.entry_id)

    def _set_tier(self, entry: StateEntry, tier: Tier | None) -> None:
        """Move a state's accounting to `tier` (None: out of every tier)."""
        if entry.tier is not None:
            used_by = self._used_by[entry.tier]
            self._used[entry.tier] -= entry.cost
            left = used_by.get(entry.api_key_hash, 0) - entry.cost
            if left > 0:
                used_by[entry.api_key_hash] = left
            else:
                used_by.pop(entry.api_key_hash, None)
            self._count[entry.tier] -= 1
        entry.tier, entry.cost = tier, 0
        if tier is not None:
            entry.cost = 1 if tier is Tier.RESIDENT else entry.size
            self._used[tier] += entry.cost
            self._used_by[tier][entry.api_key_hash] = self._used_by[tier].get(entry.api_key_hash, 0) + entry.cost
            self._count[tier] += 1

    def _drop(self, entry: StateEntry) -> None:
        """Forget a state wherever it is; a resident one's context is cleared (once its turn is over)."""
        slot = entry.held
        if slot is not None:
            slot.entry, entry.held = None, None
            if not slot.busy:  # a running turn's context is cleared when it is released
                self._engine.reset_context(slot.context)
        self._set_tier(entry, None)
        self._discard(entry)
        self._entries.pop(entry.entry_id, None)

    def _discard(self, entry: StateEntry) -> None:
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)
            entry.path = None
        entry.blob = None

    def _publish(self) -> None:
        for tier in (Tier.HOST, Tier.DISK):
            TIER_BYTES.labels(self._model, tier).set(self._used[tier])
            TIER_ENTRIES.labels(self._model, tier).set(self._count[tier])
