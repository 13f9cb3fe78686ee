"""Structured output and tools through the whole stack with the official client, as clients send them.

`parse()` with a pydantic model, pydantic-derived strict tools, the tool-result round trip, streamed call deltas
exactly as OpenAI streams them, a call cut by max_tokens, duplicate tool names, and the hostile schemas of the
reliability issue: each a 400 well before any generation, with both chat workers still the same processes after.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.openapi import validate
from tests.support.stack import pid_serving

pytestmark = pytest.mark.e2e

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


class Unit(BaseModel):
    name: str
    symbol: str


class GetWeather(BaseModel):
    """Get the current weather for a city."""

    city: str
    unit: Unit | None


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population: int = Field(ge=0, le=100_000_000)  # unbounded, a tiny model may write digits until max_tokens


def ask(text: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": text}]


def test_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model="gpt-4o",
        messages=ask("Give me the capital of France as a city record."),
        response_format=City,
        temperature=0,
        max_tokens=120,
    )
    city = completion.choices[0].message.parsed
    assert completion.choices[0].finish_reason == "stop" and isinstance(city, City)


def test_strict_pydantic_tool_with_defs_round_trip(client):
    tools = [openai.pydantic_function_tool(GetWeather)]
    assert tools[0]["function"]["strict"] and "$defs" in tools[0]["function"]["parameters"]
    messages = ask("What is the weather in Paris?")
    first = client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=tools, tool_choice="required", temperature=0, max_tokens=80
    )
    assert first.choices[0].finish_reason == "tool_calls"
    calls = first.choices[0].message.tool_calls
    for call in calls:
        GetWeather.model_validate_json(call.function.arguments)
    messages += [first.choices[0].message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": '{"temperature_c": 18}'} for c in calls]
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=messages, tools=tools, temperature=0, max_tokens=40
    )
    validate("CreateChatCompletionResponse", json.loads(raw.text))
    assert raw.parse().choices[0].finish_reason in ("stop", "tool_calls", "length")


def test_a_json_schema_answer_beside_tools_on_auto(client):
    # The model calls a tool or answers in the schema (OpenAI applies both); this question has no tool to call.
    raw = client.chat.completions.with_raw_response.parse(
        model="gpt-4o",
        messages=ask("Give me the capital of France as a city record."),
        response_format=City,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="auto",
        temperature=0,
        max_tokens=120,
    )
    validate("CreateChatCompletionResponse", json.loads(raw.text))
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert isinstance(choice.message.parsed, City)


def test_tool_choice_none_and_allowed_tools_keep_the_prompt(client):
    # Every tool stays in the prompt whatever tool_choice says, so the turns share it; the constraint decides.
    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(City, name="get_city")]
    messages = ask("What is the weather in Paris?")
    required = client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=tools, tool_choice="required", temperature=0, max_tokens=80
    )
    none = client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=tools, tool_choice="none", temperature=0, max_tokens=20
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    assert none.usage.prompt_tokens == required.usage.prompt_tokens
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_city"}}
    ]}}  # fmt: skip
    only_city = client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=tools, tool_choice=allowed, temperature=0, max_tokens=120
    )
    assert {c.function.name for c in only_city.choices[0].message.tool_calls} == {"get_city"}
    assert only_city.usage.prompt_tokens == required.usage.prompt_tokens


def sse_chunks(stack, body: dict) -> list[dict]:
    with httpx.stream(
        "POST",
        f"{stack.base_url}/chat/completions",
        json={"model": "gpt-4o", "stream": True, **body},
        headers={"authorization": f"Bearer {stack.api_key}"},
        timeout=300,
    ) as response:
        assert response.status_code == 200
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_streamed_call_deltas_are_shaped_exactly_like_openais(stack):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": GetWeather.model_json_schema()}}
    chunks = sse_chunks(
        stack, {"messages": ask("Weather in Rome?"), "tools": [tool], "tool_choice": "required", "temperature": 0}
    )
    deltas = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert all(len(c["choices"][0]["delta"].get("tool_calls") or [None]) == 1 for c in chunks if c["choices"])
    seen: set[int] = set()
    for d in deltas:
        if d["index"] not in seen:
            seen.add(d["index"])
            assert d["id"].startswith("call_") and d["type"] == "function"
            assert d["function"] == {"name": "get_weather", "arguments": ""}
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
    assert seen == set(range(len(seen))) and seen
    for index in seen:
        GetWeather.model_validate_json("".join(d["function"]["arguments"] for d in deltas if d["index"] == index))
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == [
        "tool_calls"
    ]


def test_a_named_tool_choice_streams_exactly_one_call(stack):
    """OpenAI forces one call for a named choice; a second call of the same function, cut by max_tokens, made the
    Node SDK's accumulator read the name `get_weatherget_weather`."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": GetWeather.model_json_schema()}}
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": ask("Weather in Rome?"), "tools": [tool], "tool_choice": choice, "max_tokens": 64}
    chunks = sse_chunks(stack, {**body, "temperature": 0})
    deltas = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert {d["index"] for d in deltas} == {0}
    assert [d["function"]["name"] for d in deltas if "name" in d["function"]] == ["get_weather"]
    GetWeather.model_validate_json("".join(d["function"]["arguments"] for d in deltas))
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == [
        "tool_calls"
    ]


def test_a_call_cut_by_max_tokens_finishes_with_length(client):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": GetWeather.model_json_schema()}}
    completion = client.chat.completions.create(
        model="gpt-4o", messages=ask("Weather in Oslo?"), tools=[tool], tool_choice="required", max_tokens=8
    )
    assert completion.choices[0].finish_reason == "length"


def test_duplicate_tool_names_are_400(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=ask("hi"), tools=[tool, tool])
    assert info.value.body["param"] == "tools[1].function.name"


HOSTILE = {
    "maxLength 100000": {"type": "string", "maxLength": 100000},
    "pattern a{0,100000}": {"type": "string", "pattern": "a{0,100000}"},
    "negative maxLength": {"type": "string", "maxLength": -1},
    "array nesting 100": json.loads('{"type": "array", "items": ' * 100 + '{"type": "integer"}' + "}" * 100),
    "minItems 1e9": {"type": "array", "items": {"type": "integer"}, "minItems": 1_000_000_000},
    "enum of 100,000 strings": {"enum": [f"value {i}" for i in range(100_000)]},
    "minimum > maximum": {"type": "integer", "minimum": 10, "maximum": 1},
    "remote $ref": {"$ref": "https://example.com/schema.json"},
    "unenforceable keyword": {"type": "array", "uniqueItems": True},
}


def test_hostile_schemas_are_400_at_once_and_no_worker_dies(stack, client):
    workers = {name: pid_serving(stack.addresses[name]) for name in ("chat-1", "chat-2")}
    timings = {}
    for name, schema in HOSTILE.items():
        started = time.perf_counter()
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="gpt-4o",
                messages=ask("x"),
                response_format={"type": "json_schema", "json_schema": {"name": "h", "schema": schema}},
            )
        timings[name] = time.perf_counter() - started
        assert info.value.body["param"] == "response_format", name
    # Loose: 100 ms is the goal on a quiet machine (the chat benchmark's constrained row and docs give figures).
    assert max(timings.values()) < 1.0, timings
    for _ in range(2):  # both workers still answer, and are the same processes (no crash, no restart)
        reply = client.chat.completions.create(
            model="gpt-4o", messages=ask("Say hi."), max_tokens=3, extra_body={"session": "none"}
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert {name: pid_serving(stack.addresses[name]) for name in workers} == workers
