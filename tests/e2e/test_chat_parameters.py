"""One behavioural test per chat parameter, on the real model, through the official client; every response and
stream chunk is validated against OpenAI's schemas."""

from __future__ import annotations

import json

import httpx
import jsonschema
import llama_cpp
import pytest

from services.common.config import Capability, load_config, resolve_model_path
from tests.support.openapi import validate

pytestmark = pytest.mark.e2e

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def create(client, **kwargs):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", **kwargs)
    validate("CreateChatCompletionResponse", json.loads(raw.text))
    return raw.parse()


def stream(client, **kwargs):
    chunks = list(client.chat.completions.create(model="gpt-4o", stream=True, **kwargs))
    extensions = {"ark"} if kwargs.get("extra_body", {}).get("ark_metadata") else set()  # asked for: ARK's own field
    for chunk in chunks:
        validate(
            "CreateChatCompletionStreamResponse",
            chunk.model_dump(mode="json", exclude_unset=True),
            extensions=extensions,
        )
    return chunks


def ask(text: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": text}]


def test_stop_truncates_before_the_sequence(client):
    full = create(client, messages=ask("Count from 1 to 10, separated by commas."), temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    assert "," in text
    cut = create(client, messages=ask("Count from 1 to 10, separated by commas."), temperature=0, stop=[","])
    assert cut.choices[0].message.content == text.split(",")[0]
    assert cut.choices[0].finish_reason == "stop"


def test_same_seed_same_output_other_seed_other_output(client):
    def sample(seed: int) -> str:
        completion = create(client, messages=ask("Tell me a short story."), temperature=1.0, seed=seed, max_tokens=30)
        return completion.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_a_seeded_request_repeated_in_its_session_gives_the_same_long_output(client):
    """The default client keeps its session cookie, so the second request could continue the first one's state;
    a seeded request is computed from the start each time instead (docs/api.md), and reports nothing reused."""
    messages = ask("Write a long story about a lighthouse keeper and a storm.")
    first, second = (create(client, messages=messages, temperature=1.0, seed=99, max_tokens=120) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.completion_tokens == second.usage.completion_tokens > 60
    assert second.usage.prompt_tokens_details.cached_tokens == 0


def test_n_gives_n_choices(client):
    completion = create(client, messages=ask("Name an animal."), n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert all(c.message.content for c in completion.choices)
    chunks = stream(client, messages=ask("Name an animal."), n=2, temperature=1.0, seed=7, max_tokens=8)
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_json_schema_output_parses_and_validates(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    completion = create(
        client,
        messages=ask("Describe a cat."),
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content), schema)


def test_json_object_output_parses(client):
    completion = create(
        client,
        messages=[
            {"role": "system", "content": "You reply only with compact JSON."},
            {"role": "user", "content": 'Give the capital of France as JSON like {"capital": "..."}'},
        ],
        temperature=0,
        max_tokens=100,
        response_format={"type": "json_object"},
    )
    assert json.loads(completion.choices[0].message.content)["capital"] == "Paris"


def test_a_schema_that_cannot_be_compiled_is_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        create(
            client,
            messages=ask("x"),
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strange"}}},
        )
    assert info.value.body["param"] == "response_format"


def test_forced_tool_call_returns_parseable_arguments(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        completion = create(
            client,
            messages=ask("What is the weather in Paris?"),
            tools=[WEATHER_TOOL],
            tool_choice=choice,
            temperature=0,
        )
        assert completion.choices[0].finish_reason == "tool_calls"
        call = completion.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_streamed_tool_call_deltas_assemble_like_openai(client):
    chunks = stream(
        client, messages=ask("Weather in Rome?"), tools=[WEATHER_TOOL], tool_choice="required", temperature=0
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].type == "function"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert "city" in json.loads(arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_choice_none_answers_in_text(client):
    completion = create(
        client, messages=ask("What is the capital of France?"), tools=[WEATHER_TOOL], tool_choice="none", temperature=0
    )
    assert completion.choices[0].message.tool_calls is None and "Paris" in completion.choices[0].message.content


def test_logprobs_are_log_probabilities_with_alternatives(client):
    completion = create(client, messages=ask("Say hello."), logprobs=True, top_logprobs=3, max_tokens=5, temperature=0)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for position in content:
        assert position.logprob <= 0 and len(position.top_logprobs) == 3
        assert all(alt.logprob <= 0 for alt in position.top_logprobs)
        assert position.top_logprobs[0].logprob >= position.logprob - 1e-4  # greedy: the best alternative
    chunks = stream(client, messages=ask("Say hello."), logprobs=True, top_logprobs=2, max_tokens=4, temperature=0)
    streamed = [p for c in chunks if c.choices and c.choices[0].logprobs for p in c.choices[0].logprobs.content]
    assert len(streamed) == 4 and all(len(p.top_logprobs) == 2 for p in streamed)


def test_logit_bias_bans_a_token(client):
    plain = create(client, messages=ask("What is the capital of France?"), temperature=0, max_tokens=3, logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    model = load_config(env={}).models_for(Capability.CHAT)[0]
    vocab = llama_cpp.Llama(model_path=str(resolve_model_path(model.path)), vocab_only=True, verbose=False)
    (token_id,) = vocab.tokenize(first.encode(), add_bos=False, special=False)
    banned = create(
        client,
        messages=ask("What is the capital of France?"),
        temperature=0,
        max_tokens=3,
        logprobs=True,
        logit_bias={str(token_id): -100},
    )
    assert banned.choices[0].logprobs.content[0].token != first


REPEAT = ask("Write the word hello thirty times, separated by spaces.")


@pytest.mark.parametrize(
    "penalty",
    [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.5}}],
    ids=["frequency_penalty", "presence_penalty", "repetition_penalty"],
)
def test_a_penalty_reduces_repetition(client, penalty):
    """Greedy decoding of a request to repeat a word, with and without a strong penalty: the same request, so any
    difference is the penalty's (a penalty that were ignored would give the same text)."""

    def count(**extra) -> int:
        completion = create(client, messages=REPEAT, temperature=0, max_tokens=40, **extra)
        return completion.choices[0].message.content.lower().count("hello")

    plain = count()
    assert plain >= 10, "the unpenalised answer repeats the word"
    assert count(**penalty) < plain / 2


@pytest.mark.parametrize(
    "narrowing",
    [{"top_p": 0.01}, {"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}],
    ids=["top_p", "top_k", "min_p"],
)
def test_a_sampling_bound_that_keeps_one_token_is_greedy_at_any_temperature(client, narrowing):
    """top_p 0.01, top_k 1 and min_p 1 each keep only the likeliest token: at temperature 2 the answer is then the
    greedy one whatever the seed. Without the bound the same seeds sample other answers (the control)."""
    story = ask("Tell me a short story about a dragon.")

    def text(**extra) -> str:
        return create(client, messages=story, max_tokens=20, **extra).choices[0].message.content

    greedy = text(temperature=0)
    seeds = (1, 2, 3)
    assert any(text(temperature=2.0, seed=seed) != greedy for seed in seeds), "the control: sampling differs"
    assert all(text(temperature=2.0, seed=seed, **narrowing) == greedy for seed in seeds)


def test_usage_on_every_chunk_and_ark_metadata(client):
    chunks = stream(
        client,
        messages=ask("Say hello."),
        max_tokens=5,
        extra_body={"stream_usage_every_chunk": True, "ark_metadata": True},
    )
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 5
    ark = chunks[-1].model_extra["ark"]
    assert set(ark) == {"cached_tokens", "state_tier", "session", "timings"}
    assert ark["timings"]["time_to_first_token_seconds"] > 0


def test_session_none_is_stateless(stack):
    body = {"model": "gpt-4o", "messages": ask("Hi"), "max_tokens": 2, "session": "none"}
    response = httpx.post(
        f"{stack.base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {stack.api_key}"}
    )
    assert response.status_code == 200 and "set-cookie" not in response.headers


def test_keepalive_comments_while_a_long_prompt_is_processed(stack):
    long_prompt = "Summarise this: " + "The quick brown fox jumps over the lazy dog. " * 150
    body = {
        "model": "gpt-4o",
        "messages": ask(long_prompt),
        "max_tokens": 2,
        "stream": True,
        "stream_keepalive_seconds": 0.05,
        "session": "none",
    }
    headers = {"authorization": f"Bearer {stack.api_key}"}
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", json=body, headers=headers, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    first_content = next(i for i, line in enumerate(lines) if '"content":"' in line and '"content":""' not in line)
    assert ": keep-alive" in lines[:first_content]
    assert lines[-1] == "data: [DONE]"
