"""Chat completions through the whole stack, driven by the official openai client (sync and async)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.support.openapi import validate

pytestmark = pytest.mark.e2e

PARIS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Please name the capital of France."},
]


def assert_usage_adds_up(usage) -> None:
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_answers_and_validates(client):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=PARIS, temperature=0)
    assert raw.headers["x-request-id"].startswith("req_")
    completion = raw.parse()
    validate("CreateChatCompletionResponse", json.loads(raw.text))
    assert "Paris" in completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "smollm2-135m-instruct"
    assert_usage_adds_up(completion.usage)


def test_alias_and_model_id_give_the_same_answer(client):
    by_alias = client.chat.completions.create(model="gpt-3.5-turbo", messages=PARIS, temperature=0, max_tokens=12)
    by_id = client.chat.completions.create(model="smollm2-135m-instruct", messages=PARIS, temperature=0, max_tokens=12)
    assert by_alias.choices[0].message.content == by_id.choices[0].message.content


def test_max_tokens_bounds_the_completion(client):
    endless = {"0": -100, "2": -100}  # end-of-turn tokens banned: only the budget can end these
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Count to 100."}], max_tokens=5, logit_bias=endless
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    limited = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Count to 100."}],
        max_completion_tokens=3,
        logit_bias=endless,
    )
    assert limited.usage.completion_tokens == 3 and limited.choices[0].finish_reason == "length"


def test_stream_chunks_validate_and_carry_usage(client):
    stream = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=PARIS, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    assert stream.headers["content-type"].startswith("text/event-stream")
    chunks = list(stream.parse())
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert_usage_adds_up(usage_chunk.usage)
    assert all(c.usage is None for c in chunks[:-1])
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) <= usage_chunk.usage.completion_tokens


def test_stream_wire_format_ends_with_done(stack):
    body = {"model": "gpt-4o", "messages": PARIS, "stream": True, "max_tokens": 4}
    headers = {"authorization": f"Bearer {stack.api_key}"}
    with httpx.stream("POST", f"{stack.base_url}/chat/completions", json=body, headers=headers, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        validate("CreateChatCompletionStreamResponse", json.loads(line.removeprefix("data: ")))


async def test_async_client_streams_and_completes(async_client):
    completion = await async_client.chat.completions.create(model="gpt-4o-mini", messages=PARIS, temperature=0)
    assert "Paris" in completion.choices[0].message.content
    stream = await async_client.chat.completions.create(model="gpt-4o-mini", messages=PARIS, temperature=0, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == completion.choices[0].message.content


async def test_concurrent_requests_all_succeed(async_client):
    questions = ["What is 2+2?", "Name a colour.", "Say hello.", "Please name the capital of France."]
    results = await asyncio.gather(
        *(
            async_client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=16
            )
            for q in questions
        )
    )
    assert all(r.choices[0].message.content for r in results)


def test_client_disconnect_aborts_generation(stack):
    # One session (the cookie pins both requests to one worker). End-of-turn tokens are banned, so unaborted the
    # first generation would hold that worker for all 3000 tokens; aborted, the next request starts at once.
    client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, http_client=httpx.Client())
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Write a very long story."}],
        stream=True,
        max_tokens=3000,
        logit_bias={"0": -100, "2": -100},
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert client._client.cookies.get("ark_session_id")
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert raw.headers["x-ark-session"] == "resumed"
    assert time.perf_counter() - started < 15


def test_models_list_and_retrieve(client, stack):
    raw = client.models.with_raw_response.list()
    validate("ListModelsResponse", json.loads(raw.text))
    ids = {m.id for m in raw.parse().data}
    assert {"smollm2-135m-instruct", "gpt-4o", "gpt-3.5-turbo"} <= ids
    model = client.models.retrieve("gpt-4o")
    validate("Model", model.model_dump(mode="json"))
    assert model.id == "gpt-4o"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


# -- error paths ---------------------------------------------------------------------------------------------------


def post(stack, body: bytes | str, *, key: str | None = "default", content_type: str = "application/json"):
    headers = {"content-type": content_type}
    if key is not None:
        headers["authorization"] = f"Bearer {stack.api_key if key == 'default' else key}"
    return httpx.post(f"{stack.base_url}/chat/completions", content=body, headers=headers, timeout=60)


def assert_error(response, status: int, *, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers.get("x-request-id")
    payload = response.json()
    validate("ErrorResponse", payload)
    if param is not None:
        assert payload["error"]["param"] == param
    if code is not None:
        assert payload["error"]["code"] == code
    return payload["error"]


def test_missing_and_wrong_key_are_401(stack):
    body = json.dumps({"model": "gpt-4o", "messages": PARIS})
    assert_error(post(stack, body, key=None), 401)
    assert_error(post(stack, body, key="sk-wrong-key-000000"), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.base_url, api_key="sk-wrong-key-000000", max_retries=0).models.list()


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=PARIS)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "gpt-4o", "messages": [', None),  # malformed JSON
        ("[1, 2]", None),  # not an object
        ('{"model": "gpt-4o", "messages": "hello"}', "messages"),  # wrong type
        ('{"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        ('{"model": "gpt-4o", "messages": []}', "messages"),  # empty messages
        ('{"model": "gpt-4o"}', "messages"),  # missing messages
        ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 99999999}', "max_tokens"),
        ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}', "temperature"),
        ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "temperature": -1}', "temperature"),
        ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
        ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "bogus_field": 1}', "bogus_field"),
        ('{"model": "gpt-4o", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    ],
)
def test_bad_requests_are_400_with_param(stack, body, param):
    error = assert_error(post(stack, body), 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_unsupported_parameter_is_named(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=PARIS, web_search_options={})
    assert info.value.body["code"] == "unsupported_parameter" and info.value.body["param"] == "web_search_options"


def test_ignored_parameters_are_reported(client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=PARIS, max_tokens=2, user="alice", metadata={"k": "v"}
    )
    assert raw.headers["x-ark-ignored-params"] == "metadata,user"


def test_context_overflow_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "word " * 9000}])
    assert info.value.body["code"] == "context_length_exceeded"


def test_oversized_body_is_413(stack):
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]})
    assert_error(post(stack, body), 413)


def test_health_needs_no_key_and_unknown_route_is_enveloped(stack):
    assert httpx.get(f"{stack.root_url}/health").status_code == 200
    response = httpx.get(f"{stack.base_url}/nothing-here", headers={"authorization": f"Bearer {stack.api_key}"})
    assert_error(response, 404)
