"""Conversation states on a chat worker: which context continues a request, and where the others wait.

A session (cookie) is a namespace of many conversations, so a worker keeps many conversation states per API key:
a few live in the engine's resident contexts, the rest are saved by the engine (`export_state`) into the host and
disk tiers (services.chat.state_tiers) and loaded back (`import_state`) on their next turn. A request is matched by
content against every state of its API key — the worker's own raw transcript tokens included — and continues the
one sharing the longest token prefix; the conversation key the edge computes breaks ties. States never serve
another API key, whatever the content.

Before a resident context is given to another conversation, its state is saved, not dropped; a state lost from
every tier costs a recompute, never an error. Resident contexts are shared fairly between keys: a key holding more
than its share of them gives up its own least recent context first.

Threading: everything runs on the event loop except exports, imports and tier I/O, which go to a thread; callers
hold the generation layer's admission slot, so one checkout runs at a time per context.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.chat.domain import Message
from services.chat.engines.base import ChatEngine
from services.chat.state_tiers import StateTiers
from services.chat.transcript import Transcript, shared_prefix

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ConversationState:
    """What the worker knows of one conversation of one API key."""

    api_key_hash: str
    session_id: str
    conversation_key: str
    idle_timeout: float
    last_used: float
    transcript: Transcript | None = None
    tokens: tuple[int, ...] = ()  # the tokens a saved state covers (resident states ask their context)
    entry_id: str = ""  # the saved state in the tiers, when not resident


@dataclass(slots=True)
class _Slot:
    context: Any
    state: ConversationState | None = None
    last_used: float = 0.0
    busy: bool = False  # a turn is running in it: neither a candidate nor a victim until released


@dataclass(slots=True)
class Checkout:
    """The context a request runs in (None: every context is busy, so the turn runs without keeping its state),
    with its prompt and where the reused state came from."""

    context: Any
    state: ConversationState
    prompt_text: str
    tokens: list[int]
    tier: str  # "resident", "host", "disk" or "" (nothing reused)
    released: bool = False


@dataclass(slots=True)
class _Candidate:
    state: ConversationState
    slot: _Slot | None
    prompt_text: str
    tokens: list[int]
    matched: int
    rank: tuple = field(default=())


Render = Callable[..., str]

# Another conversation's state is reused (and first saved) only for a prefix at least this long, such as a shared
# system prompt; a few template tokens in common are cheaper to recompute than a state is to save.
MIN_SHARED_TOKENS = 32


class ConversationStates:
    """Resident contexts plus saved states, for one model."""

    def __init__(
        self,
        engine: ChatEngine,
        contexts: list[Any],
        *,
        tiers: StateTiers | None = None,
        key_share: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._slots = [_Slot(c) for c in contexts]
        self._tiers = tiers
        self._key_share = key_share
        self._clock = clock
        self._saved: dict[str, ConversationState] = {}  # tier entry id -> state
        # Turns of different requests run at once (the engine batches them); their checkouts take turns.
        self._lock = asyncio.Lock()

    # -- status -----------------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return len(self._slots)

    @property
    def resident(self) -> int:
        return sum(1 for s in self._slots if s.state is not None)

    @property
    def saved(self) -> int:
        return len(self._saved)

    # -- a request's context ----------------------------------------------------------------------------------------

    async def checkout(
        self,
        *,
        api_key_hash: str,
        session_id: str,
        conversation_key: str,
        idle_timeout: float,
        messages: Sequence[Message],
        render: Render,
        continue_from: Callable[[Transcript, Sequence[Message]], list[int] | None],
        encode: Callable[[Sequence[Message]], list[int]],
    ) -> Checkout:
        """The context to run a request in, holding the best state of its key, and the prompt to run; `release`
        it when the turn is over."""
        async with self._lock:  # turns take the store one at a time
            await self.expire_idle()
            prompt_text = render(messages)
            plain: list[int] | None = None
            best: _Candidate | None = None
            for state, slot in self._states_of(api_key_hash):
                tokens = None
                if state.transcript is not None:
                    tokens = continue_from(state.transcript, messages)
                continued = tokens is not None
                if tokens is None:
                    plain = plain if plain is not None else encode(messages)
                    tokens = plain
                held = self._engine.context_tokens(slot.context) if slot is not None else state.tokens
                matched = shared_prefix(held, tokens)
                same = bool(conversation_key) and state.conversation_key == conversation_key
                if not (matched >= MIN_SHARED_TOKENS or (matched and (same or continued))):
                    continue  # a few template tokens in common: not worth saving another conversation's state for
                if slot is None and not (same or continued) and matched < len(held):
                    continue  # restoring would take another conversation's saved state away from it
                rank = (matched, same, slot is not None, state.last_used)
                if best is None or rank > best.rank:
                    best = _Candidate(state, slot, prompt_text, tokens, matched, rank)
            now = self._clock()
            if best is None:
                slot = await self._free_slot(api_key_hash)
                if slot is None:
                    state = ConversationState(api_key_hash, session_id, conversation_key, idle_timeout, now)
                    return Checkout(None, state, prompt_text, plain if plain is not None else encode(messages), "")
                self._engine.reset_context(slot.context)
                state = ConversationState(api_key_hash, session_id, conversation_key, idle_timeout, now)
                return self._bind(slot, state, prompt_text, plain if plain is not None else encode(messages), "")
            if best.slot is not None:
                slot = best.slot
                diverges = best.matched < len(self._engine.context_tokens(slot.context))
                if diverges and not (conversation_key and best.state.conversation_key == conversation_key):
                    await self._save(slot)  # another conversation's state: keep it before reusing the shared prefix
                    state = ConversationState(api_key_hash, session_id, conversation_key, idle_timeout, now)
                else:
                    state = best.state
                return self._bind(
                    slot,
                    self._touch(state, session_id, conversation_key, idle_timeout),
                    *self._prompt(best),
                    "resident",
                )
            slot = await self._free_slot(api_key_hash)
            if slot is None:
                state = ConversationState(api_key_hash, session_id, conversation_key, idle_timeout, now)
                return Checkout(None, state, prompt_text, plain if plain is not None else encode(messages), "")
            tier = await self._restore(best.state, slot)
            if not tier:
                self._engine.reset_context(slot.context)
                best.state.transcript = None
            state = self._touch(best.state, session_id, conversation_key, idle_timeout)
            return self._bind(slot, state, *self._prompt(best), tier)

    def _prompt(self, best: _Candidate) -> tuple[str, list[int]]:
        return best.prompt_text, best.tokens

    def _touch(self, state: ConversationState, session_id: str, key: str, idle_timeout: float) -> ConversationState:
        state.session_id = session_id or state.session_id
        state.conversation_key = key or state.conversation_key
        state.idle_timeout = idle_timeout or state.idle_timeout
        state.last_used = self._clock()
        return state

    def _bind(self, slot: _Slot, state: ConversationState, text: str, tokens: list[int], tier: str) -> Checkout:
        state.entry_id, state.tokens = "", ()
        state.transcript, transcript = None, state.transcript  # until this turn completes
        slot.state, slot.last_used, slot.busy = state, self._clock(), True
        del transcript
        return Checkout(slot.context, state, text, tokens, tier)

    def _states_of(self, api_key_hash: str) -> list[tuple[ConversationState, _Slot | None]]:
        out: list[tuple[ConversationState, _Slot | None]] = [
            (s.state, s)
            for s in self._slots
            if s.state is not None and not s.busy and s.state.api_key_hash == api_key_hash
        ]
        out.extend((state, None) for state in self._saved.values() if state.api_key_hash == api_key_hash)
        return out

    # -- making room ------------------------------------------------------------------------------------------------

    async def _free_slot(self, api_key_hash: str) -> _Slot | None:
        """A context to hold a new or restored state: a free one, else the least recent of a key over its share;
        None when every context is running a turn."""
        for slot in self._slots:
            if slot.state is None and not slot.busy:
                return slot
        idle = [s for s in self._slots if not s.busy and s.state is not None]
        if not idle:
            return None
        held: dict[str, int] = {}
        for slot in self._slots:
            if slot.state is not None:
                held[slot.state.api_key_hash] = held.get(slot.state.api_key_hash, 0) + 1
        share = max(1, int(self._key_share * len(self._slots)))
        over = [s for s in idle if held[s.state.api_key_hash] > share]
        mine = [s for s in idle if s.state.api_key_hash == api_key_hash]
        # Fair share: a key over its share gives up its own contexts first; otherwise the least recent goes.
        pool = (mine if held.get(api_key_hash, 0) >= share else over) or idle
        victim = min(pool, key=lambda s: s.last_used)
        await self._save(victim)
        return victim

    async def _save(self, slot: _Slot) -> None:
        """Move a resident state to the tiers (or let it go when there are none); the context is then free."""
        state = slot.state
        slot.state = None
        if state is None or (state.transcript is None and not self._engine.context_tokens(slot.context)):
            return
        if self._tiers is None:
            return
        tokens = tuple(self._engine.context_tokens(slot.context))
        blob = await asyncio.to_thread(self._engine.export_state, slot.context)
        if not blob:
            return
        entry = await asyncio.to_thread(
            self._tiers.put,
            api_key_hash=state.api_key_hash,
            session_id=state.session_id,
            conversation_key=state.conversation_key,
            tokens=tokens,
            blob=blob,
        )
        if entry is None:
            return
        state.entry_id, state.tokens = entry.entry_id, tokens
        # The tiers may have dropped states this one supersedes; forget those.
        for entry_id in [e for e in self._saved if self._tiers.tier_of(e) is None]:
            del self._saved[entry_id]
        self._saved[entry.entry_id] = state

    async def _restore(self, state: ConversationState, slot: _Slot) -> str:
        """Load a saved state into `slot`'s context; the tier it came from, or "" if it was lost."""
        entry_id = state.entry_id
        self._saved.pop(entry_id, None)
        if self._tiers is None or not entry_id:
            return ""
        context, tokens = slot.context, state.tokens
        # restore() takes the state out of its tier, loads it and records the restore latency (metrics).
        tier = await asyncio.to_thread(
            self._tiers.restore, entry_id, lambda blob: self._engine.import_state(context, blob, tokens)
        )
        return str(tier) if tier else ""

    # -- ending states ----------------------------------------------------------------------------------------------

    def complete(self, checkout: Checkout, transcript: Transcript | None) -> None:
        """The turn is done: the state now covers its transcript."""
        checkout.state.transcript = transcript
        checkout.state.last_used = self._clock()

    def release(self, checkout: Checkout) -> None:
        """The turn's engine work is over (completed or not): its context may serve other turns again. Only the
        first call counts (the context may be another turn's by a later one)."""
        if checkout.released:
            return
        checkout.released = True
        for slot in self._slots:
            if slot.context is checkout.context and slot.busy:
                slot.busy = False
                if slot.state is None:  # dropped while it ran
                    self._engine.reset_context(slot.context)

    async def drop_session(self, session_id: str) -> bool:
        """Forget every state of a session, in every tier."""
        found = False
        for slot in self._slots:
            if slot.state is not None and slot.state.session_id == session_id:
                slot.state = None
                if not slot.busy:  # a running turn's context is reset when it is released
                    self._engine.reset_context(slot.context)
                found = True
        for entry_id in [e for e, s in self._saved.items() if s.session_id == session_id]:
            del self._saved[entry_id]
            found = True
        if self._tiers is not None:
            found |= bool(await asyncio.to_thread(self._tiers.drop_session, session_id))
        return found

    async def expire_idle(self) -> int:
        """Forget states idle past their timeout, in every tier; returns how many."""
        now = self._clock()

        def idle(state: ConversationState) -> bool:
            return bool(state.idle_timeout) and now - state.last_used > state.idle_timeout

        expired = 0
        for slot in self._slots:
            if slot.state is not None and not slot.busy and idle(slot.state):
                slot.state = None
                self._engine.reset_context(slot.context)
                expired += 1
        for entry_id in [e for e, s in self._saved.items() if idle(s)]:
            del self._saved[entry_id]
            if self._tiers is not None:
                await asyncio.to_thread(self._tiers.drop, entry_id)
            expired += 1
        return expired

    def close(self) -> None:
        if self._tiers is not None:
            self._tiers.close()
