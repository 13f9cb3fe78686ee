"""LiteLLM's tools and structured output against ARK: tools (auto, named, the tool-result round trip, streamed) and
`response_format` given a pydantic model, as LiteLLM's documentation writes them."""

from __future__ import annotations

import json

import litellm
import pytest
from pydantic import BaseModel

from tests.compat.conftest import CHAT_MODEL, CLIENT_TIMEOUT, WEATHER_PARAMETERS
from tests.support.stack import RunningStack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning"),
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
WEATHER_QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Use the tools you are given."},
    {"role": "user", "content": "What is the weather in Paris?"},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class Person(BaseModel):
    name: str
    age: int


def complete(stack: RunningStack, **kwargs):
    options = {
        "model": f"openai/{CHAT_MODEL}",
        "api_base": stack.base_url,
        "api_key": stack.api_key,
        "max_retries": 0,
        "timeout": CLIENT_TIMEOUT,
        "messages": WEATHER_QUESTION,
        "temperature": 0,
        "max_tokens": 120,
    }
    return litellm.completion(**(options | kwargs))


def assert_weather_call(call) -> dict:
    assert call.id and call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and args["city"]
    assert set(args) <= {"city", "unit"}
    return args


def test_tools_auto_answers_or_calls_the_tool(stack):
    choice = complete(stack, tools=[WEATHER_TOOL], tool_choice="auto").choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert_weather_call(call)
    else:
        assert choice.finish_reason == "stop" and choice.message.content


def test_tools_named_choice_calls_that_tool(stack):
    choice = complete(stack, tools=[WEATHER_TOOL], tool_choice=NAMED).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert_weather_call(choice.message.tool_calls[0])


def test_the_tool_result_round_trip(stack):
    messages = list(WEATHER_QUESTION)
    message = complete(stack, messages=messages, tools=[WEATHER_TOOL], tool_choice="required").choices[0].message
    assert message.tool_calls
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        args = assert_weather_call(call)
        result = json.dumps({"city": args["city"], "temperature": 21, "sky": "sunny"})
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    choice = complete(stack, messages=messages, tools=[WEATHER_TOOL]).choices[0]
    assert choice.finish_reason in {"stop", "tool_calls"}
    assert choice.message.content or choice.message.tool_calls


def test_streamed_tool_call_assembles_into_one_call(stack):
    chunks = list(complete(stack, tools=[WEATHER_TOOL], tool_choice=NAMED, stream=True))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=WEATHER_QUESTION)
    assert rebuilt.choices[0].finish_reason == "tool_calls"
    assert len(rebuilt.choices[0].message.tool_calls) == 1
    assert_weather_call(rebuilt.choices[0].message.tool_calls[0])


def test_response_format_pydantic_model(stack):
    reply = complete(
        stack,
        messages=[{"role": "user", "content": "Alice is a 30 year old engineer. Describe her."}],
        response_format=Person,
    )
    person = Person.model_validate_json(reply.choices[0].message.content)
    assert person.name
