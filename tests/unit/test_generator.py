"""The generation layer against a fake engine: no model, every engine-agnostic behaviour.

The fake engine tokenizes one character per token, renders a transparent template, and answers with a scripted
reply per sequence, so each assertion can name the exact tokens the layer should have sent or kept.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from services.chat.domain import (
    Admitted,
    Delta,
    Finished,
    FinishReason,
    GenerationRequest,
    Message,
    Role,
    Sampling,
    Started,
    Tool,
    ToolChoice,
    ToolChoiceMode,
)
from services.chat.generator import Generator
from services.common.errors import InvalidRequestError, OverloadedError, UnsupportedParameterError
from tests.support.fake_engine import FakeEngine, request


async def collect(generator: Generator, req: GenerationRequest) -> list:
    """The events after `Admitted` (which test_admitted_comes_first_and_bad_input_never_gets_it covers)."""
    events = [event async for event in generator.generate(req)]
    assert isinstance(events[0], Admitted)
    return events[1:]


def text_of(events: list, choice: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta) and e.choice_index == choice)


async def test_started_then_deltas_then_finished_with_usage():
    engine = FakeEngine()
    events = await collect(Generator(engine, max_queue=4), request())
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert text_of(events) == "Hello!"
    finished = events[-1]
    assert finished.finish_reason is FinishReason.STOP and not finished.more_choices
    assert finished.usage.completion_tokens == len("Hello!")
    assert finished.usage.prompt_tokens == events[0].prompt_tokens == len(engine.runs[0].prompt)


async def test_stop_string_cuts_the_text_and_stops_the_engine():
    engine = FakeEngine(lambda p, i: "one, two. three")
    events = await collect(Generator(engine, max_queue=4), request(sampling=Sampling(temperature=0, stop=(".",))))
    assert text_of(events) == "one, two"
    assert events[-1].finish_reason is FinishReason.STOP
    assert 0 in engine.runs[0].stopped


async def test_max_tokens_is_length_and_counts_exactly():
    engine = FakeEngine(lambda p, i: "abcdefghij")
    events = await collect(Generator(engine, max_queue=4), request(sampling=Sampling(temperature=0, max_tokens=4)))
    assert text_of(events) == "abcd"
    assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("req", "param"),
    [
        (request(sampling=Sampling(logit_bias={5000: 1.0})), "logit_bias"),
        (request(sampling=Sampling(max_tokens=10_000)), "max_tokens"),
        (request("x" * 500), "messages"),
    ],
)
async def test_bad_input_raises_before_started_and_before_the_engine(req, param):
    engine = FakeEngine()
    generator = Generator(engine, max_queue=4)
    seen = []
    with pytest.raises(InvalidRequestError) as err:
        async for event in generator.generate(req):
            seen.append(event)
    # The context budget needs the prompt's tokens, so it is checked once admitted: nothing but Admitted is seen.
    assert err.value.param == param and not [e for e in seen if not isinstance(e, Admitted)] and engine.runs == []


async def test_engine_refusal_comes_before_started():
    engine = FakeEngine()
    engine.refuse = "n > 1 needs temperature > 0 on this engine"
    with pytest.raises(UnsupportedParameterError):
        await collect(Generator(engine, max_queue=4), request())
    assert engine.runs == []


async def test_n_choices_each_finish_and_usage_adds_up():
    engine = FakeEngine(lambda p, i: f"answer {i}")
    events = await collect(Generator(engine, max_queue=4), request(sampling=Sampling(temperature=1.0, n=3, seed=7)))
    finished = [e for e in events if isinstance(e, Finished)]
    assert [f.choice_index for f in finished] == [0, 1, 2]
    assert [f.more_choices for f in finished] == [True, True, False]
    assert [text_of(events, i) for i in range(3)] == ["answer 0", "answer 1", "answer 2"]
    assert finished[-1].usage.completion_tokens == 3 * len("answer 0")
    assert engine.runs[0].n == 3


async def test_logprobs_travel_with_each_token():
    engine = FakeEngine()
    events = await collect(Generator(engine, max_queue=4), request(sampling=Sampling(temperature=0, logprobs=True)))
    deltas = [e for e in events if isinstance(e, Delta) and e.text]
    assert deltas and all(d.logprobs and d.logprobs[0].sampled.logprob == -0.5 for d in deltas)
    assert "".join(d.logprobs[0].sampled.token for d in deltas) == "Hello!"


async def test_closing_the_stream_aborts_the_engine():
    engine = FakeEngine(lambda p, i: "x" * 100)
    engine.hold = asyncio.Event()
    generator = Generator(engine, max_queue=4)
    stream = generator.generate(request())
    assert isinstance(await anext(stream), Admitted)
    assert isinstance(await anext(stream), Started)
    engine.hold.set()
    assert isinstance(await anext(stream), Delta)
    await stream.aclose()
    await asyncio.wait_for(engine.aborted.wait(), 5)
    assert engine.runs[0].abort.is_set()
    # The slot is free again: the next request runs.
    engine.hold = None
    assert text_of(await collect(generator, request())) == "x" * 100


async def test_queue_overflow_is_refused_at_once():
    engine = FakeEngine()
    engine.hold = asyncio.Event()
    generator = Generator(engine, max_queue=1)
    first = generator.generate(request())
    await anext(first)  # holds the only slot
    waiting = asyncio.create_task(collect(generator, request()))
    while generator.status().queued_requests < 1:  # noqa: ASYNC110 - polls the layer's own counter
        await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError):
        await collect(generator, request())
    engine.hold.set()
    await first.aclose()
    assert text_of(await waiting) == "Hello!"


async def test_session_continues_from_its_raw_tokens_including_hidden_ones():
    # The model "says" more than the client sees: the stop string cuts the visible reply.
    engine = FakeEngine(lambda p, i: "Sure. [hidden]")
    generator = Generator(engine, max_queue=4)
    stop = Sampling(temperature=0, stop=("[",))
    first = await collect(generator, request("Hi", session="s1", sampling=stop))
    visible = text_of(first)
    assert visible == "Sure. "
    history = (Message(Role.USER, "Hi"), Message(Role.ASSISTANT, visible))
    second = await collect(generator, request("More", history=history, session="s1", sampling=stop))
    run1, run2 = engine.runs
    kept = [*run1.prompt, *[ord(c) for c in "Sure. ["]]  # raw tokens up to where the stop was seen
    assert list(run2.prompt[: len(kept)]) == kept
    # Everything the context already held is reused; only the closing and the new message are computed.
    assert second[0].cached_tokens >= len(run1.prompt) + len("Sure. ")
    assert run2.context is run1.context


async def test_edited_history_falls_back_to_a_rendering_and_reuses_up_to_the_divergence():
    engine = FakeEngine()
    generator = Generator(engine, max_queue=4)
    # The edge names the conversation by its opening messages, which an edit further on leaves unchanged.
    await collect(generator, request("Hi", session="s1", conversation_key="m:1"))
    history = (Message(Role.USER, "Hi"), Message(Role.ASSISTANT, "Edited!"))
    events = await collect(generator, request("More", history=history, session="s1", conversation_key="m:1"))
    prompt = engine.runs[1].prompt
    assert list(prompt) == engine.encode_prompt(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Edited!"},
            {"role": "user", "content": "More"},
        ]
    )
    assert 0 < events[0].cached_tokens < len(prompt)


async def test_a_session_is_never_resumed_under_another_key():
    engine = FakeEngine()
    generator = Generator(engine, max_queue=4)
    await collect(generator, request("Hi", session="s1", key="k1"))
    history = (Message(Role.USER, "Hi"), Message(Role.ASSISTANT, "Hello!"))
    events = await collect(generator, request("More", history=history, session="s1", key="k2"))
    assert events[0].cached_tokens == 0


async def test_stateless_requests_carry_the_key_as_cache_salt():
    engine = FakeEngine()
    generator = Generator(engine, max_queue=4)
    await collect(generator, request(key="k1"))
    assert engine.runs[0].cache_salt == "k1" and engine.runs[0].context is None
    assert engine.runs[0].retention_seconds == 0


async def test_dropping_a_session_frees_its_context():
    engine = FakeEngine()
    generator = Generator(engine, max_queue=4)
    await collect(generator, request(session="s1"))
    assert generator.status().resident_sessions == 1
    assert await generator.drop_session("s1")
    assert generator.status().resident_sessions == 0


TOOLS = (
    Tool(
        "get_weather", "Weather for a city", json.dumps({"type": "object", "properties": {"city": {"type": "string"}}})
    ),
)


async def test_a_required_tool_call_is_parsed_into_call_deltas():
    engine = FakeEngine(lambda p, i: '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    req = request("Weather?", tools=TOOLS, tool_choice=ToolChoice(ToolChoiceMode.REQUIRED))
    events = await collect(Generator(engine, max_queue=4), req)
    calls = [c for e in events if isinstance(e, Delta) for c in e.tool_calls]
    assert calls[0].function_name == "get_weather" and calls[0].id
    assert json.loads("".join(c.arguments_delta for c in calls)) == {"city": "Paris"}
    assert events[-1].finish_reason is FinishReason.TOOL_CALLS
    assert text_of(events) == ""


async def test_a_tool_call_cut_by_max_tokens_finishes_with_length():
    engine = FakeEngine(lambda p, i: '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    req = request(
        "Weather?", tools=TOOLS, tool_choice=ToolChoice(ToolChoiceMode.REQUIRED), sampling=Sampling(0, max_tokens=30)
    )
    events = await collect(Generator(engine, max_queue=4), req)
    assert events[-1].finish_reason is FinishReason.LENGTH


async def test_admitted_comes_first_and_bad_input_never_gets_it():
    """The edge retries a request elsewhere only if its worker died before `Admitted`: bad input checked before the
    queue must raise without it, and work on a request must come after it."""
    engine = FakeEngine()
    generator = Generator(engine, max_queue=4)
    stream = generator.generate(request())
    admitted = await anext(stream)
    assert isinstance(admitted, Admitted) and admitted.queue_seconds >= 0
    assert not engine.runs  # nothing ran yet
    assert isinstance(await anext(stream), Started)
    await stream.aclose()
    bad = request(sampling=Sampling(logit_bias={10**6: 1.0}))
    with pytest.raises(InvalidRequestError):
        await anext(generator.generate(bad))
