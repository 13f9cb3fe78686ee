"""Output constraints on the real model over real gRPC: JSON Schema, JSON mode, tool calls, hostile schemas.

The worker must answer every hostile schema with INVALID_ARGUMENT (well under a second) or a valid bounded
generation, and keep serving afterwards.
"""

from __future__ import annotations

import json
import time

import grpc
import jsonschema
import pytest

from ark.chat.v1 import chat_service_pb2 as pb
from services.chat.metrics import FORCED_TOKENS
from services.common.errors import InvalidRequestError
from services.common.grpc_errors import from_rpc_error
from tests.integration.test_chat_service import collect, request

pytestmark = pytest.mark.integration

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
        "role": {"enum": ["admin", "user"]},
        "kind": {"const": "person"},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "role", "kind", "tags"],
    "additionalProperties": False,
    "$defs": {"tag": {"type": "string", "maxLength": 12, "description": "a short label"}},
}
WEATHER = pb.Tool(
    name="get_weather",
    description="Current weather in a city",
    parameters_json=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}
    ),
    strict=True,
)


def schema_request(server, schema: dict, *, max_tokens: int = 200, text: str = "Describe a person as JSON."):
    req = request(server, text, max_tokens=max_tokens)
    req.response_format.CopyFrom(
        pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(schema), schema_name="s")
    )
    return req


def tools_request(server, text: str, *, mode=pb.TOOL_CHOICE_MODE_REQUIRED, max_tokens: int = 100, name: str = ""):
    req = request(server, text, max_tokens=max_tokens)
    req.tools.append(WEATHER)
    req.tools.append(pb.Tool(name="get_time", parameters_json='{"type": "object", "properties": {}}'))
    req.tool_choice.CopyFrom(pb.ToolChoice(mode=mode, function_name=name))
    req.parallel_tool_calls = True
    return req


def text_of(messages) -> str:
    return "".join(m.delta.text for m in messages if m.WhichOneof("event") == "delta")


def calls_of(messages) -> list[dict]:
    calls: dict[int, dict] = {}
    for m in messages:
        for d in m.delta.tool_calls if m.WhichOneof("event") == "delta" else ():
            call = calls.setdefault(d.index, {"id": d.id, "name": d.function_name, "arguments": ""})
            call["arguments"] += d.arguments_delta
    return [calls[i] for i in sorted(calls)]


async def test_json_schema_output_validates(chat_server):
    messages = await collect(chat_server.stub.StreamGenerateChatCompletion(schema_request(chat_server, PERSON)))
    assert messages[-1].finished.finish_reason == pb.FINISH_REASON_STOP
    jsonschema.validate(json.loads(text_of(messages)), PERSON)


async def test_json_object_output_parses(chat_server):
    req = request(chat_server, 'Reply with a JSON object like {"name": "Tom"} for a cat.', max_tokens=60)
    req.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
    messages = await collect(chat_server.stub.StreamGenerateChatCompletion(req))
    assert messages[-1].finished.finish_reason == pb.FINISH_REASON_STOP, text_of(messages)
    assert isinstance(json.loads(text_of(messages)), dict)


async def test_required_tool_call_has_valid_arguments(chat_server):
    req = tools_request(chat_server, "What is the weather in Paris?")
    messages = await collect(chat_server.stub.StreamGenerateChatCompletion(req))
    assert messages[-1].finished.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    calls = calls_of(messages)
    assert calls and all(c["id"].startswith("call_") for c in calls) and text_of(messages) == ""
    for call in calls:
        assert call["name"] in ("get_weather", "get_time")
        assert isinstance(json.loads(call["arguments"]), dict)


async def test_named_function_is_the_one_called(chat_server):
    req = tools_request(chat_server, "Weather in Rome?", mode=pb.TOOL_CHOICE_MODE_FUNCTION, name="get_weather")
    req.parallel_tool_calls = False
    messages = await collect(chat_server.stub.StreamGenerateChatCompletion(req))
    (call,) = calls_of(messages)
    assert call["name"] == "get_weather" and set(json.loads(call["arguments"])) == {"city"}


async def test_a_forced_call_head_is_evaluated_at_once_not_sampled_token_by_token(chat_server):
    """Jump-forward decoding: a named call's head, `{"name": "get_weather", "arguments": {"city":`, is all the
    grammar allows, so the engine evaluates it in one step instead of sampling it; the call is the same valid call,
    and its tokens are counted as output. With logprobs asked for, every position is sampled (each needs its own
    distribution)."""
    forced = FORCED_TOKENS.labels(chat_server.model_id)

    async def named_call(**sampling) -> tuple[dict, list, float]:
        before = forced._value.get()
        req = tools_request(chat_server, "Weather in Rome?", mode=pb.TOOL_CHOICE_MODE_FUNCTION, name="get_weather")
        req.parallel_tool_calls = False
        for key, value in sampling.items():
            setattr(req.sampling, key, value)
        messages = await collect(chat_server.stub.StreamGenerateChatCompletion(req))
        (call,) = calls_of(messages)
        assert call["name"] == "get_weather" and set(json.loads(call["arguments"])) == {"city"}
        return call, messages, forced._value.get() - before

    call, messages, jumped = await named_call()
    assert jumped >= 10, jumped
    assert messages[-1].finished.usage.completion_tokens > jumped
    sampled_call, sampled_messages, jumped = await named_call(logprobs=True)
    assert jumped == 0
    positions = [p for m in sampled_messages if m.WhichOneof("event") == "delta" for p in m.delta.logprobs]
    assert len(positions) == sampled_messages[-1].finished.usage.completion_tokens
    assert sampled_call["arguments"] == call["arguments"]  # greedy either way


async def test_a_call_cut_by_max_tokens_finishes_with_length(chat_server):
    req = tools_request(chat_server, "What is the weather in Paris?", max_tokens=12, name="get_weather")
    req.tool_choice.mode = pb.TOOL_CHOICE_MODE_FUNCTION
    messages = await collect(chat_server.stub.StreamGenerateChatCompletion(req))
    assert messages[-1].finished.finish_reason == pb.FINISH_REASON_LENGTH


HOSTILE = {
    "maxLength 100000": {"type": "string", "maxLength": 100000},
    "pattern a{0,100000}": {"type": "string", "pattern": "a{0,100000}"},
    "negative maxLength": {"type": "string", "maxLength": -1},
    "array nesting 100": json.loads('{"type": "array", "items": ' * 100 + '{"type": "integer"}' + "}" * 100),
    "minItems 1e9": {"type": "array", "items": {"type": "integer"}, "minItems": 1_000_000_000},
    "enum of 100,000": {"enum": [f"value {i}" for i in range(100_000)]},
    "minimum > maximum": {"type": "integer", "minimum": 10, "maximum": 1},
    "remote $ref": {"$ref": "https://example.com/schema.json"},
    "uniqueItems": {"type": "array", "uniqueItems": True},
}
BOUNDED = {  # valid schemas that used to hang a worker: now a generation within max_tokens
    "catastrophic pattern (a+)+$": {"type": "string", "pattern": "(a+)+$"},
    "minItems/maxItems 100": {"type": "array", "items": {"type": "integer"}, "minItems": 100, "maxItems": 100},
    "minLength 1000": {"type": "string", "minLength": 1000},
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_schemas_are_refused_at_once(chat_server, name):
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        await collect(chat_server.stub.StreamGenerateChatCompletion(schema_request(chat_server, HOSTILE[name])))
    elapsed = time.perf_counter() - started
    error = from_rpc_error(info.value)
    assert isinstance(error, InvalidRequestError) and error.param == "response_format", error.message
    assert elapsed < 1.0, f"{name}: {elapsed:.3f} s"  # loose here; the edge-level e2e test bounds it at 100 ms


@pytest.mark.parametrize("name", sorted(BOUNDED))
async def test_formerly_hanging_schemas_generate_within_max_tokens(chat_server, name):
    messages = await collect(
        chat_server.stub.StreamGenerateChatCompletion(schema_request(chat_server, BOUNDED[name], max_tokens=40))
    )
    finished = messages[-1].finished
    assert finished.usage.completion_tokens <= 40
    text = text_of(messages)
    if finished.finish_reason == pb.FINISH_REASON_STOP:
        jsonschema.validate(json.loads(text), BOUNDED[name])
    else:
        assert finished.finish_reason == pb.FINISH_REASON_LENGTH


async def test_the_worker_still_serves_after_the_hostile_catalogue(chat_server):
    messages = await collect(
        chat_server.stub.StreamGenerateChatCompletion(request(chat_server, "What is the capital of France?"))
    )
    assert "Paris" in text_of(messages)
