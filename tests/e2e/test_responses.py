"""/v1/responses and /v1/conversations through the whole stack with the official openai client: bodies and every
streamed event validated against OpenAI's schemas, continuations that reuse the earlier chain's state, stored
objects scoped to their API key, background responses, and OpenAI's errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import openai
import pytest
from pydantic import BaseModel

from edge.clients.stored_objects import RESPONSE, StoredObjects
from services.common.config import api_key_hash
from tests.support.openapi import validate
from tests.support.stack import RunningStack

pytestmark = pytest.mark.e2e

MODEL = "gpt-4o"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def other(stack: RunningStack):
    with openai.OpenAI(base_url=stack.base_url, api_key=stack.other_api_key, max_retries=0, timeout=120) as c:
        yield c


def create(client: openai.OpenAI, **kw) -> dict:
    """responses.create, with the raw body validated against the spec; returns the body."""
    raw = client.responses.with_raw_response.create(model=MODEL, temperature=0, **kw)
    body = json.loads(raw.text)
    validate("Response", body)
    return body


def test_create_returns_a_response_object_with_usage(client):
    body = create(client, input="Say hello.", max_output_tokens=20, metadata={"k": "v"})
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["status"] in ("completed", "incomplete")
    message = body["output"][0]
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    assert message["content"][0]["type"] == "output_text" and message["content"][0]["text"]
    usage = body["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens_details"]["reasoning_tokens"] == 0
    assert body["metadata"] == {"k": "v"} and body["store"] is True
    response = client.responses.retrieve(body["id"])
    assert response.output_text == message["content"][0]["text"]


def test_a_cut_answer_is_incomplete_for_max_output_tokens(client):
    body = create(client, input="Write a long story about a dragon.", max_output_tokens=16)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 16


def test_previous_response_id_continues_on_the_state_of_the_whole_chain(client):
    first = create(client, instructions="You are terse.", input="My name is Ada. Remember it.", max_output_tokens=24)
    second = create(client, previous_response_id=first["id"], input="What is my name?", max_output_tokens=24)
    third = create(client, previous_response_id=second["id"], input="Thank you.", max_output_tokens=8)
    # The second turn's prompt is the first turn's (without its instructions, which are not carried over) plus new
    # tokens; the third reuses all of the second's prompt and answer.
    assert second["usage"]["input_tokens_details"]["cached_tokens"] > 0
    cached = third["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= second["usage"]["input_tokens"] + second["usage"]["output_tokens"] - 2
    assert third["usage"]["input_tokens_details"]["cache_write_tokens"] == third["usage"]["input_tokens"] - cached
    assert second["instructions"] is None and second["previous_response_id"] == first["id"]
    # Two children of one parent both work (branching).
    branch = create(client, previous_response_id=first["id"], input="Spell my name.", max_output_tokens=8)
    assert branch["usage"]["input_tokens_details"]["cached_tokens"] > 0


async def test_a_stored_response_holds_its_own_items_and_links_to_the_previous(client, stack: RunningStack):
    first = create(client, instructions="You are terse.", input="My name is Ada.", max_output_tokens=16)
    second = create(client, previous_response_id=first["id"], input="What is my name?", max_output_tokens=16)
    third = create(client, previous_response_id=second["id"], input="Spell it.", max_output_tokens=8)
    # The chain was rebuilt from the links: the whole of it is reused.
    cached = third["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= second["usage"]["input_tokens"] + second["usage"]["output_tokens"] - 2
    stored = StoredObjects(stack.addresses["registry"], token=stack.internal_token)
    try:
        record = (await stored.get(api_key_hash(stack.api_key), RESPONSE, third["id"])).record
    finally:
        await stored.close()
    # Its own input and output only (storage grows linearly with the turns), and the link to the previous one.
    assert [i["content"][0]["text"] for i in record["input"]] == ["Spell it."] and "context" not in record
    assert [o["id"] for o in record["response"]["output"]] == [o["id"] for o in third["output"]]
    assert record["response"]["previous_response_id"] == second["id"]
    # input_items lists the response's own input, as OpenAI does for a response made with previous_response_id.
    assert [i.content[0].text for i in client.responses.input_items.list(third["id"]).data] == ["Spell it."]
    # A missing link is OpenAI's 400 for an unknown previous response, naming it.
    client.responses.delete(second["id"])
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id=third["id"], max_output_tokens=4)
    assert e.value.body["param"] == "previous_response_id" and second["id"] in e.value.message
    assert client.responses.retrieve(third["id"]).id == third["id"]


def test_stream_events_follow_the_spec(client):
    seen = []
    # The SDK's helper needs `response.completed`: the answer must end before its bound.
    with client.responses.stream(model=MODEL, input="Say hi.", max_output_tokens=400, temperature=0) as stream:
        for event in stream:
            seen.append(event.model_dump(mode="json", exclude_unset=True))
        final = stream.get_final_response()
    assert [e["sequence_number"] for e in seen] == list(range(len(seen)))
    types = [e["type"] for e in seen]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert types[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    text = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")
    assert final.output_text == text and client.responses.retrieve(final.id).output_text == text


def test_raw_stream_sends_named_events_and_only_comments_between(stack: RunningStack):
    body = {"model": MODEL, "input": "Hi", "stream": True, "max_output_tokens": 4, "stream_keepalive_seconds": 0.001}
    headers = {"authorization": f"Bearer {stack.api_key}"}
    with httpx.stream("POST", f"{stack.base_url}/responses", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    for line in lines:
        assert line.startswith(("event: ", "data: ", ":")), line
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names == [e["type"] for e in events]
    for event in events:  # what ARK sent, before any client parsed it
        validate("ResponseStreamEvent", event)


class City(BaseModel):
    name: str
    country: str


def test_parse_with_a_pydantic_text_format(client):
    parsed = client.responses.parse(
        model=MODEL, input="Name a city in France.", text_format=City, max_output_tokens=60, temperature=0
    )
    assert isinstance(parsed.output_parsed, City)
    validate("Response", json.loads(client.responses.with_raw_response.retrieve(parsed.id).text))


def test_function_call_round_trip_over_previous_response_id(client):
    first = create(
        client,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    calls = [o for o in first["output"] if o["type"] == "function_call"]
    assert calls and calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"])["city"]
    assert calls[0]["call_id"] and calls[0]["id"].startswith("fc_")
    second = create(
        client,
        previous_response_id=first["id"],
        tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": calls[0]["call_id"], "output": '{"celsius": 21}'}],
        max_output_tokens=30,
    )
    assert second["output"]
    assert second["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"]
    # The same reuse as chat completions gets for the same turns (a conversation of its own: another city).
    chat_tool = {
        "type": "function",
        "function": {k: WEATHER[k] for k in ("name", "description", "parameters", "strict")},
    }
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[chat_tool],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    )
    call = reply.choices[0].message.tool_calls[0]
    messages += [
        reply.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
    ]
    again = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[chat_tool], temperature=0, max_tokens=30
    )
    chat_missed = again.usage.prompt_tokens - again.usage.prompt_tokens_details.cached_tokens
    responses_missed = second["usage"]["input_tokens"] - second["usage"]["input_tokens_details"]["cached_tokens"]
    assert responses_missed <= chat_missed + 4, (responses_missed, chat_missed)


def test_allowed_tools_and_named_tool_choice(client):
    other_tool = {**WEATHER, "name": "get_time", "description": "Current time of a city."}
    body = create(
        client,
        input="Weather in Rome?",
        tools=[WEATHER, other_tool],
        tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]},
        parallel_tool_calls=False,
    )
    assert [o["name"] for o in body["output"] if o["type"] == "function_call"] == ["get_time"]
    body = create(
        client, input="Hi", tools=[WEATHER, other_tool], tool_choice={"type": "function", "name": "get_weather"}
    )
    assert body["output"][0]["name"] == "get_weather"


def test_a_turn_with_another_tool_choice_still_reuses_the_whole_chain(client):
    # tool_choice changes what the output may be, never the prompt: every turn renders the same tools.
    other_tool = {**WEATHER, "name": "get_time", "description": "Current time of a city."}
    tools = [WEATHER, other_tool]
    first = create(
        client, input="What is the weather in Paris?", tools=tools, tool_choice="required", parallel_tool_calls=False
    )
    [call] = [o for o in first["output"] if o["type"] == "function_call"]
    second = create(
        client,
        previous_response_id=first["id"],
        tools=tools,
        tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": '{"celsius": 21}'}],
        max_output_tokens=30,
    )
    assert [o["type"] for o in second["output"]] == ["message"]
    assert second["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"]
    third = create(
        client,
        previous_response_id=second["id"],
        tools=tools,
        tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]},
        input="And what time is it there?",
        parallel_tool_calls=False,
    )
    assert [o["name"] for o in third["output"] if o["type"] == "function_call"] == ["get_time"]
    assert third["usage"]["input_tokens_details"]["cached_tokens"] >= second["usage"]["input_tokens"]


def test_a_json_schema_answer_beside_tools_on_auto(client):
    # The model calls a tool or answers in the schema (OpenAI applies both); this question has no tool to call.
    parsed = client.responses.parse(
        model=MODEL,
        input="Name a city in France.",
        text_format=City,
        tools=[WEATHER],
        tool_choice="auto",
        max_output_tokens=60,
        temperature=0,
    )
    assert [o.type for o in parsed.output] == ["message"] and isinstance(parsed.output_parsed, City)
    validate("Response", json.loads(client.responses.with_raw_response.retrieve(parsed.id).text))


def test_item_reference_and_input_items(client):
    first = create(
        client, input=[{"role": "user", "content": [{"type": "input_text", "text": "Say yes."}]}], max_output_tokens=8
    )
    answer = first["output"][0]
    second = create(
        client,
        input=[
            {"role": "user", "content": "Say yes."},
            {"type": "item_reference", "id": answer["id"]},
            {"role": "user", "content": "Again."},
        ],
        max_output_tokens=8,
    )
    assert second["usage"]["input_tokens_details"]["cached_tokens"] > 0
    raw = client.responses.input_items.with_raw_response.list(second["id"], order="asc")
    page = json.loads(raw.text)
    validate("ResponseItemList", page)
    assert [i["type"] for i in page["data"]] == ["message", "message", "message"]
    assert page["data"][1]["id"] == answer["id"] and page["first_id"] == page["data"][0]["id"]
    one = client.responses.input_items.list(second["id"], order="asc", limit=1)
    assert len(one.data) == 1 and one.has_more
    rest = client.responses.input_items.list(second["id"], order="asc", after=one.data[0].id)
    assert [i.id for i in rest.data] == [i["id"] for i in page["data"][1:]] and not rest.has_more


def test_delete_forgets_the_response(client):
    body = create(client, input="Hi", max_output_tokens=4)
    deleted = client.responses.delete(body["id"])
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(body["id"])


def test_input_tokens_counts_the_prompt(client):
    counted = client.responses.input_tokens.count(model=MODEL, input="Say hello.")
    body = create(client, input="Say hello.", max_output_tokens=4)
    assert counted.input_tokens == body["usage"]["input_tokens"]


def test_openai_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_" + "0" * 32)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_" + "1" * 32)
    assert e.value.body["param"] == "previous_response_id"
    conversation = client.conversations.create()
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_x", conversation=conversation.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", background=True, store=False)
    assert e.value.body["param"] == "background"
    body = create(client, input="Hi", max_output_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(body["id"])
    for tool in (
        {"type": "web_search"},
        {"type": "file_search", "vector_store_ids": ["vs"]},
        {"type": "code_interpreter", "container": {"type": "auto"}},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input="x", tools=[tool])
        assert tool["type"] in e.value.message and e.value.body["param"] == "tools[0].type"


def test_reasoning_and_encrypted_content_are_accepted_and_return_nothing(client):
    body = create(
        client, input="Hi", max_output_tokens=4, reasoning={"effort": "low"}, include=["reasoning.encrypted_content"]
    )
    assert all(o["type"] != "reasoning" for o in body["output"])


def test_logprobs_are_included_on_request(client):
    body = create(client, input="Hi", max_output_tokens=4, top_logprobs=2, include=["message.output_text.logprobs"])
    logprobs = body["output"][0]["content"][0]["logprobs"]
    assert len(logprobs) == body["usage"]["output_tokens"] and len(logprobs[0]["top_logprobs"]) == 2


def test_another_key_cannot_touch_a_stored_response_or_conversation(client, other):
    body = create(client, input="Hi", max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(body["id"])
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(body["id"])
    with pytest.raises(openai.NotFoundError):
        other.responses.cancel(body["id"])
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(body["id"])
    with pytest.raises(openai.BadRequestError):
        other.responses.create(model=MODEL, input="x", previous_response_id=body["id"])
    conversation = client.conversations.create(items=[{"role": "user", "content": "secret"}])
    with pytest.raises(openai.NotFoundError):
        other.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        other.conversations.items.list(conversation.id)
    with pytest.raises(openai.NotFoundError):
        other.conversations.delete(conversation.id)
    assert client.responses.retrieve(body["id"]).id == body["id"]


def test_conversations_hold_the_turns_of_their_responses(client):
    raw = client.conversations.with_raw_response.create(
        items=[{"type": "message", "role": "user", "content": "My favourite colour is green."}], metadata={"t": "1"}
    )
    conversation = json.loads(raw.text)
    validate("ConversationResource", conversation)
    cid = conversation["id"]
    first = create(client, conversation=cid, input="Remember that.", max_output_tokens=16)
    second = create(client, conversation=cid, input="What is my favourite colour?", max_output_tokens=16)
    assert second["conversation"] == {"id": cid}
    cached = second["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["input_tokens"] + first["usage"]["output_tokens"] - 2
    # A response of a conversation continues over previous_response_id too: its history is the conversation's
    # items before its own, then its own.
    third = create(client, previous_response_id=second["id"], input="Thanks.", max_output_tokens=8)
    cached = third["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= second["usage"]["input_tokens"] + second["usage"]["output_tokens"] - 2
    page = json.loads(client.conversations.items.with_raw_response.list(cid, order="asc").text)
    validate("ConversationItemList", page)
    roles = [i.get("role") for i in page["data"]]
    assert roles == ["user", "user", "assistant", "user", "assistant"]
    added = client.conversations.items.create(cid, items=[{"type": "message", "role": "user", "content": "More."}])
    item_id = added.data[0].id
    assert client.conversations.items.retrieve(item_id, conversation_id=cid).id == item_id
    client.conversations.items.delete(item_id, conversation_id=cid)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(item_id, conversation_id=cid)
    updated = client.conversations.update(cid, metadata={"t": "2"})
    assert updated.metadata == {"t": "2"}
    deleted = json.loads(client.conversations.with_raw_response.delete(cid).text)
    validate("DeletedConversationResource", deleted)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(cid)


def wait_for(client: openai.OpenAI, response_id: str, statuses: set[str], within: float = 120):
    deadline = time.monotonic() + within
    while (response := client.responses.retrieve(response_id)).status not in statuses:
        assert time.monotonic() < deadline, response.status
        time.sleep(0.1)
    return response


def test_background_poll_resume_and_cancel(client, stack: RunningStack):
    queued = client.responses.create(model=MODEL, input="Say hi.", background=True, max_output_tokens=12)
    assert queued.status in ("queued", "in_progress") and queued.background
    wait_for(client, queued.id, {"completed", "incomplete"})
    validate("Response", json.loads(client.responses.with_raw_response.retrieve(queued.id).text))
    with client.responses.retrieve(queued.id, stream=True, starting_after=1) as stream:
        resumed = [e.model_dump(mode="json", exclude_unset=True) for e in stream]
    assert resumed[0]["sequence_number"] == 2 and resumed[-1]["type"] in ("response.completed", "response.incomplete")
    url = f"{stack.base_url}/responses/{queued.id}?stream=true&starting_after=0"
    with httpx.stream("GET", url, headers={"authorization": f"Bearer {stack.api_key}"}, timeout=120) as r:
        raw = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in raw] == list(range(1, len(raw) + 1))
    for event in raw:
        validate("ResponseStreamEvent", event)
    long = client.responses.create(
        model=MODEL, input="Write a very long essay.", background=True, max_output_tokens=2000
    )
    wait_for(client, long.id, {"in_progress"})
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    final = wait_for(client, long.id, {"cancelled"})
    assert final.status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(long.id)


def generating(stack: RunningStack) -> float:
    """Generations running on the chat workers now (their gRPC calls in flight)."""
    total = 0.0
    for worker in ("chat-1", "chat-2"):
        for line in httpx.get(stack.metrics_url(worker), timeout=5).text.splitlines():
            if line.startswith("ark_grpc_requests_in_flight{") and 'method="StreamGenerateChatCompletion"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(condition, within: float, what: str) -> float:
    """Seconds until `condition()` holds (polled); fails after `within`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - start


# An answer that cannot end early: a string of at least 10,000 characters (thousands of tokens, tens of seconds).
ENDLESS = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 10000}},
    "required": ["story"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("endpoint", ["responses", "chat/completions"])
async def test_a_non_streaming_client_that_goes_away_cancels_its_generation(stack: RunningStack, endpoint: str):
    await asyncio.to_thread(wait_until, lambda: generating(stack) == 0, 120, "idle workers")
    if endpoint == "responses":
        fmt = {"format": {"type": "json_schema", "name": "s", "schema": ENDLESS}}
        body = {"model": MODEL, "input": "Write a very long story.", "max_output_tokens": 4000, "text": fmt}
    else:
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": ENDLESS}}
        messages = [{"role": "user", "content": "Write a very long story."}]
        body = {"model": MODEL, "messages": messages, "max_tokens": 4000, "response_format": fmt}
    headers = {"authorization": f"Bearer {stack.api_key}"}
    async with httpx.AsyncClient(timeout=300) as http:
        request = asyncio.ensure_future(http.post(f"{stack.base_url}/{endpoint}", json=body, headers=headers))
        await asyncio.to_thread(wait_until, lambda: generating(stack) == 1, 60, "the generation to start")
        assert not request.done()
        request.cancel()  # closes the connection, as a client that goes away does
        with contextlib.suppress(asyncio.CancelledError):
            await request
    # The edge cancels the worker's call at once and the worker aborts within a token; the generation itself would
    # run for thousands of tokens more.
    freed = await asyncio.to_thread(wait_until, lambda: generating(stack) == 0, 10, "the worker to drop the generation")
    print(f"\n[figures] {endpoint}: worker idle {freed:.2f} s after the client left")


def test_deleting_a_response_drops_its_conversation_state_on_the_worker(client):
    # Long enough that the chat template's opening, which any conversation of the key shares, is a small part of it.
    notes = " ".join(f"Note {i}: shelf {i} holds box {i * 7}." for i in range(12))
    opening = "Remember the word periwinkle-" + "x" * 8 + f". {notes} Reply with one word."
    first = create(client, input=opening, max_output_tokens=8)
    kept = create(client, previous_response_id=first["id"], input="Again.", max_output_tokens=8)
    assert kept["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"]
    client.responses.delete(kept["id"])
    # The chain's state is gone from every tier: continuing the first response recomputes its history.
    again = create(client, previous_response_id=first["id"], input="Again.", max_output_tokens=8)
    assert again["usage"]["input_tokens_details"]["cached_tokens"] < first["usage"]["input_tokens"] // 2
