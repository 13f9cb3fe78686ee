"""Python frameworks on ARK's Responses API, configured as their docs show: OpenAI's Agents SDK (a function tool and
an output_type, over previous_response_id, over OpenAIConversationsSession, streamed), LangChain's
ChatOpenAI(use_responses_api=True, use_previous_response_id=True) and LiteLLM's responses()."""

from __future__ import annotations

import litellm
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIConversationsSession,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.compat.conftest import CHAT_MODEL, CLIENT_TIMEOUT
from tests.support.stack import RunningStack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_.* attribute on the instance is deprecated"),
]

set_tracing_disabled(True)  # the SDK would otherwise send traces to OpenAI


class Weather(BaseModel):
    city: str
    celsius: int


calls: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """Current weather of a city."""
    calls.append(city)
    return f"It is 21 degrees celsius in {city}."


def agent(stack: RunningStack, *, tools: bool, output_type: type[BaseModel] | None = None) -> Agent:
    """An agent as the SDK's docs write one. One agent has the tool, the other the output_type: ARK's worker
    constrains a turn to tool calls or free text when tools are offered with tool_choice auto, so a structured final
    answer after a tool call is not enforced (docs/api.md#responses, limitations)."""
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=CLIENT_TIMEOUT)
    return Agent(
        name="weather",
        instructions="Answer with the weather of the city the user names."
        + (" Use the tool." if tools else " Say it is 21 degrees celsius."),
        model=OpenAIResponsesModel(model=CHAT_MODEL, openai_client=client),
        tools=[get_weather] if tools else [],
        output_type=output_type,
        # The SDK resets tool_choice to auto after the first tool call (its default), so the loop ends.
        model_settings=ModelSettings(tool_choice="required" if tools else None, temperature=0, max_tokens=120),
    )


async def test_agents_sdk_function_tool_over_previous_response_id(stack):
    calls.clear()
    first = await Runner.run(agent(stack, tools=True), "What is the weather in Paris?", max_turns=4)
    assert calls and isinstance(first.final_output, str) and first.final_output
    assert first.last_response_id and first.last_response_id.startswith("resp_")
    second = await Runner.run(
        agent(stack, tools=True), "And in Rome?", previous_response_id=first.last_response_id, max_turns=4
    )
    assert len(calls) >= 2 and second.final_output
    usage = second.raw_responses[0].usage
    assert usage.input_tokens_details.cached_tokens > 0


async def test_agents_sdk_output_type_over_a_conversations_session_streamed(stack):
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=CLIENT_TIMEOUT)
    session = OpenAIConversationsSession(openai_client=client)
    typed = agent(stack, tools=False, output_type=Weather)
    first = await Runner.run(typed, "What is the weather in Oslo?", session=session, max_turns=2)
    assert isinstance(first.final_output, Weather)
    streamed = Runner.run_streamed(typed, "And in Lima?", session=session, max_turns=2)
    kinds = {event.type async for event in streamed.stream_events()}
    assert "raw_response_event" in kinds and isinstance(streamed.final_output, Weather)
    items = await session.get_items()
    assert [i.get("role") for i in items] == ["user", "assistant", "user", "assistant"]
    second = streamed.raw_responses[-1].usage
    assert second.input_tokens_details.cached_tokens > 0
    await session.clear_session()


def test_langchain_responses_api_with_previous_response_id(stack):
    llm = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=stack.base_url,
        api_key=stack.api_key,
        max_retries=0,
        timeout=CLIENT_TIMEOUT,
        temperature=0,
        max_tokens=24,
        use_responses_api=True,
        use_previous_response_id=True,
    )
    history = [HumanMessage("My name is Ada. Say hello.")]
    first = llm.invoke(history)
    assert first.text and first.response_metadata["id"].startswith("resp_")
    history += [first, HumanMessage("What is my name?")]
    second = llm.invoke(history)
    assert second.text
    assert second.usage_metadata["input_token_details"]["cache_read"] > 0


def test_litellm_responses(stack):
    options = {"api_base": stack.base_url, "api_key": stack.api_key, "timeout": CLIENT_TIMEOUT}
    first = litellm.responses(model=f"openai/{CHAT_MODEL}", input="Say hello.", max_output_tokens=16, **options)
    assert first.id.startswith("resp_") and first.output
    cut = litellm.responses(model=f"openai/{CHAT_MODEL}", input="Write a long story.", max_output_tokens=8, **options)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    second = litellm.responses(
        model=f"openai/{CHAT_MODEL}", input="Again.", previous_response_id=first.id, max_output_tokens=16, **options
    )
    assert second.usage.input_tokens_details.cached_tokens > 0
