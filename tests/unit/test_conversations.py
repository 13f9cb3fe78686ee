"""Many conversations per session, placed by content, saved to the host and disk tiers: the generation layer with
a fake engine whose state export is its token list, and the real conversation store on a temporary directory."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest

from services.chat.domain import Delta, Finished, Message, Role, Sampling, Started
from services.chat.generator import Generator
from services.common.config import SessionsConfig
from tests.support.fake_engine import FakeContext, FakeEngine, request


class SavingEngine(FakeEngine):
    """A fake engine whose contexts can be saved and loaded (the state is the token list)."""

    context_slots = 1

    def export_state(self, context: FakeContext) -> bytes:
        return json.dumps(context.tokens).encode()

    def import_state(self, context: FakeContext, data: bytes, tokens: Sequence[int]) -> bool:
        context.tokens = json.loads(data)
        return list(tokens) == context.tokens


def answer(prompt: str, index: int) -> str:
    return f"Reply {len(prompt)}."


MB = 1024 * 1024


def sessions(tmp_path, host: int = 10_000, disk: int = 100_000) -> SessionsConfig:
    """Tiers of `host` and `disk` bytes, the disk tier in `tmp_path`."""
    return SessionsConfig(host_cache_mb=host / MB, disk_cache_mb=disk / MB, disk_dir=str(tmp_path))


@pytest.fixture
def tiers(tmp_path):
    return sessions(tmp_path)


async def turn(generator: Generator, history: list[Message], text: str, *, session="s", key="k1", conv=""):
    """One user turn appended to `history` (which gets the reply too); returns the Started event."""
    req = request(text, history=tuple(history), session=session, key=key, conversation_key=conv)
    events = [e async for e in generator.generate(req)]
    started = next(e for e in events if isinstance(e, Started))
    reply = "".join(e.text for e in events if isinstance(e, Delta))
    history += [Message(Role.USER, text), Message(Role.ASSISTANT, reply)]
    return started


async def test_interleaved_conversations_of_one_session_resume_from_the_host_tier(tiers):
    engine = SavingEngine(answer)
    generator = Generator(engine, max_queue=4, sessions=tiers)
    a, b = [], []
    await turn(generator, a, "A document about apples " * 5, conv="m:a")
    await turn(generator, b, "A document about bricks " * 5, conv="m:b")  # takes the only context: A is saved
    assert generator.status().resident_sessions == 1 and len(generator.store) == 1
    started = await turn(generator, a, "And then?", conv="m:a")
    assert started.state_tier == "host"
    assert started.cached_tokens >= len(engine.runs[0].prompt) + len("Reply 00.")
    started = await turn(generator, b, "And bricks?", conv="m:b")
    assert started.state_tier == "host" and started.cached_tokens > 100


async def test_states_spill_from_host_to_disk_and_come_back(tmp_path):
    engine = SavingEngine(answer)
    generator = Generator(engine, max_queue=4, sessions=sessions(tmp_path, host=0))
    store = generator.store
    a, b = [], []
    await turn(generator, a, "alpha " * 20)
    await turn(generator, b, "beta " * 20)
    files = [p for p in store.directory.iterdir() if not p.name.startswith(".")]
    assert len(files) == 1 and (files[0].stat().st_mode & 0o777) == 0o600
    started = await turn(generator, a, "more")
    assert started.state_tier == "disk" and started.cached_tokens > 100
    store.close()


async def test_content_never_crosses_api_keys(tiers):
    engine = SavingEngine(answer)
    generator = Generator(engine, max_queue=4, sessions=tiers)
    history: list[Message] = []
    await turn(generator, history, "shared text " * 10, key="k1")
    other = list(history[:-2])
    started = await turn(generator, other, "shared text " * 10, key="k2", session="s2")
    assert started.cached_tokens == 0


async def test_ending_a_session_drops_its_states_from_every_tier(tiers):
    engine = SavingEngine(answer)
    generator = Generator(engine, max_queue=4, sessions=tiers)
    await turn(generator, [], "one " * 10, session="s1")
    await turn(generator, [], "two " * 10, session="s2")  # s1's state goes to the host tier
    assert len(generator.store) == 1
    assert await generator.drop_session("s1")
    assert len(generator.store) == 0
    started = await turn(generator, [], "one " * 10, session="s1")
    assert started.cached_tokens <= len("<system>S<|end|>")  # only the shared system prompt is left


async def test_a_flooding_key_gives_up_its_own_contexts_first(tiers):
    engine = SavingEngine(answer)
    engine.context_slots = 2
    generator = Generator(engine, max_queue=4, sessions=tiers)
    victim: list[Message] = []
    await turn(generator, victim, "victim context " * 5, key="victim", session="v")
    for i in range(4):
        await turn(generator, [], f"flood {i} " * 5, key="flood", session=f"f{i}")
    started = await turn(generator, victim, "still there?", key="victim", session="v")
    assert started.state_tier == "resident"


async def test_without_tiers_an_evicted_conversation_is_recomputed_not_an_error():
    engine = SavingEngine(answer)
    generator = Generator(engine, max_queue=4)
    a: list[Message] = []
    await turn(generator, a, "apples " * 10)
    await turn(generator, [], "bricks " * 10)
    started = await turn(generator, a, "again")
    assert started.state_tier == "" or started.cached_tokens < 20
    assert isinstance(started, Started)


def test_sampling_default_is_greedy():
    assert request().sampling == Sampling(temperature=0.0)


async def test_a_new_conversation_never_takes_another_ones_saved_state(tiers):
    engine = SavingEngine(answer)
    generator = Generator(engine, max_queue=4, sessions=tiers)
    shared = "A long shared opening that every user of this application sends first. " * 2
    a: list[Message] = []
    await turn(generator, a, shared + "I am user A.", conv="m:a")
    await turn(generator, [], "Something else entirely.", conv="m:b")  # A's state is saved to the host tier
    started = await turn(generator, [], shared + "I am user C.", conv="m:c")  # shares the opening with A's state
    assert started.state_tier != "host"  # C did not take A's saved state
    started = await turn(generator, a, "And then?", conv="m:a")
    assert started.state_tier == "host" and started.cached_tokens >= len(engine.runs[0].prompt)


async def test_the_next_turn_finds_its_context_free_as_soon_as_the_last_event_arrives():
    """A client sends its next turn the moment it has the last event, before the server resumes the finished
    generation: that turn must continue the conversation's context, not find it still taken."""
    engine = FakeEngine(answer)
    generator = Generator(engine, max_queue=4)
    history: list[Message] = []
    first = generator.generate(request("A document about apples " * 5, session="s"))
    reply = ""
    async for event in first:
        reply += event.text if isinstance(event, Delta) else ""
        if isinstance(event, Finished) and not event.more_choices:
            break  # the generator is left suspended at its last event, as a slow server would leave it
    history += [Message(Role.USER, "A document about apples " * 5), Message(Role.ASSISTANT, reply)]
    started = await turn(generator, history, "And then?")
    assert started.state_tier == "resident" and started.cached_tokens > 100
    await first.aclose()
    assert generator.status().resident_sessions == 1


async def test_a_client_reading_its_last_event_slowly_holds_no_admission_slot():
    """The engine work is over once the last event is handed out: a client that has not read it yet must not keep
    the next request waiting (here the only slot)."""
    engine = FakeEngine(answer)
    engine.max_concurrency = 1
    generator = Generator(engine, max_queue=4)
    first = generator.generate(request("A document about apples " * 5, session="s"))
    async for event in first:
        if isinstance(event, Finished) and not event.more_choices:
            break  # the generator is left suspended at its last event, as a slow client leaves it
    assert not generator.admission.busy
    started = await asyncio.wait_for(turn(generator, [], "Another user", session="t"), timeout=30)
    assert isinstance(started, Started)
    await first.aclose()


async def test_a_saved_state_that_fails_to_load_is_recomputed_and_the_context_stays_usable(tiers):
    class BrokenLoads(SavingEngine):
        def import_state(self, context, data, tokens) -> bool:
            context.tokens = [7]  # a half-loaded context
            raise RuntimeError("a state of another model")

    engine = BrokenLoads(answer)
    generator = Generator(engine, max_queue=4, sessions=tiers)
    a: list[Message] = []
    await turn(generator, a, "A document about apples " * 5, conv="m:a")
    await turn(generator, [], "A document about bricks " * 5, conv="m:b")  # A is saved to the host tier
    started = await turn(generator, a, "And then?", conv="m:a")
    assert started.state_tier == "" and started.cached_tokens == 0
    assert len(generator.store) == 1, "B's state was saved to make room; A's unloadable one is gone"
    started = await turn(generator, a, "And after that?", conv="m:a")
    assert started.state_tier == "resident" and started.cached_tokens > 100
