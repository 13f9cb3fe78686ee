"""LangChain's tools and structured output against ARK: `bind_tools` (auto and named choice, the tool-result round
trip) and `with_structured_output` with a pydantic model, as LangChain's documentation writes them."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.compat.conftest import CHAT_MODEL, CLIENT_TIMEOUT
from tests.support.stack import RunningStack

pytestmark = pytest.mark.e2e


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather for a city."""
    return json.dumps({"city": city, "temperature": 21, "unit": unit, "sky": "sunny"})


class Person(BaseModel):
    """A person described in the text."""

    name: str = Field(description="The person's name")
    age: int = Field(description="The person's age in years")


def chat(stack: RunningStack, **kwargs) -> ChatOpenAI:
    options = {"model": CHAT_MODEL, "api_key": stack.api_key, "temperature": 0, "max_tokens": 120, "max_retries": 0}
    return ChatOpenAI(base_url=stack.base_url, timeout=CLIENT_TIMEOUT, **(options | kwargs))


WEATHER_QUESTION = [
    SystemMessage("You are a helpful assistant. Use the tools you are given."),
    HumanMessage("What is the weather in Paris?"),
]


def assert_weather_call(call: dict) -> None:
    assert call["name"] == "get_weather" and call["id"]
    assert isinstance(call["args"]["city"], str) and call["args"]["city"]
    assert set(call["args"]) <= {"city", "unit"}


def test_bind_tools_auto_answers_or_calls_the_tool(stack):
    reply = chat(stack).bind_tools([get_weather]).invoke(WEATHER_QUESTION)
    # Under `auto` a small model may answer in prose, and prose may run to max_tokens ("length"); a call is never cut.
    assert reply.response_metadata["finish_reason"] in {"stop", "tool_calls", "length"}
    if reply.tool_calls:
        assert reply.response_metadata["finish_reason"] == "tool_calls"
        for call in reply.tool_calls:
            assert_weather_call(call)
    else:
        assert reply.content
    assert not reply.invalid_tool_calls


def test_bind_tools_named_choice_calls_that_tool(stack):
    reply = chat(stack).bind_tools([get_weather], tool_choice="get_weather").invoke(WEATHER_QUESTION)
    assert reply.tool_calls and not reply.invalid_tool_calls
    assert_weather_call(reply.tool_calls[0])


def test_bind_tools_required_and_the_tool_result_round_trip(stack):
    llm = chat(stack).bind_tools([get_weather], tool_choice="any")
    messages = list(WEATHER_QUESTION)
    reply = llm.invoke(messages)
    assert reply.tool_calls
    messages.append(reply)
    for call in reply.tool_calls:
        assert_weather_call(call)
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    final = chat(stack).bind_tools([get_weather]).invoke(messages)
    assert final.response_metadata["finish_reason"] in {"stop", "tool_calls"}
    assert final.content or final.tool_calls


def test_with_structured_output_pydantic_json_schema(stack):
    # LangChain's default method for ChatOpenAI: response_format json_schema, strict.
    person = chat(stack).with_structured_output(Person).invoke("Alice is a 30 year old engineer. Describe her.")
    assert isinstance(person, Person) and person.name


def test_with_structured_output_pydantic_function_calling(stack):
    structured = chat(stack).with_structured_output(Person, method="function_calling", include_raw=True)
    result = structured.invoke("Alice is a 30 year old engineer. Describe her.")
    assert result["parsing_error"] is None
    assert isinstance(result["parsed"], Person) and result["parsed"].name


def test_streamed_tool_call_assembles_into_one_call(stack):
    llm = chat(stack).bind_tools([get_weather], tool_choice="get_weather")
    chunks = list(llm.stream(WEATHER_QUESTION))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert len(merged.tool_calls) == 1 and not merged.invalid_tool_calls
    assert_weather_call(merged.tool_calls[0])
