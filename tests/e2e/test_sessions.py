"""Stateful sessions through the whole stack, with the official client keeping the cookie in an httpx.Client."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import httpx
import openai
import pytest

from ark.chat.v1 import chat_service_pb2 as chat_pb
from ark.chat.v1 import chat_service_pb2_grpc as chat_grpc
from ark.sessions.v1 import session_registry_service_pb2 as reg_pb
from ark.sessions.v1 import session_registry_service_pb2_grpc as reg_grpc
from services.common.config import api_key_hash
from services.common.internal_auth import token_metadata
from tests.support.openapi import validate
from tests.support.stack import RunningStack, start_stack

pytestmark = pytest.mark.e2e

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTIONS = ["Please name the capital of France.", "And of Germany?", "And of Italy?"]
COOKIE = "ark_session_id"


def session_client(stack: RunningStack, key: str | None = None) -> openai.OpenAI:
    """The official client over an httpx.Client, which stores and resends cookies by itself."""
    return openai.OpenAI(
        base_url=stack.base_url, api_key=key or stack.api_key, max_retries=0, http_client=httpx.Client(timeout=120)
    )


def turn(client: openai.OpenAI, messages: list[dict], **kw):
    """A greedy turn, bounded: a tiny model's greedy reply can fall into a loop that never emits its end token (the
    first token of "What is the capital of France?" is a near tie, 0.13 apart, that the cells' layout can flip into a
    French loop), and a turn without a bound then runs for minutes."""
    kw.setdefault("max_tokens", 48)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, temperature=0, **kw)
    completion = raw.parse()
    validate("CreateChatCompletionResponse", json.loads(raw.text))
    messages.append({"role": "assistant", "content": completion.choices[0].message.content})
    return raw, completion


def cookie_of(client: openai.OpenAI) -> str | None:
    return client._client.cookies.get(COOKIE)


def present(client: openai.OpenAI, value: str) -> None:
    """Put a cookie in the client's jar exactly where the server's own would go (so a new one replaces it)."""
    client._client.cookies.set(COOKIE, value, domain="127.0.0.1", path="/")


def worker_status(stack: RunningStack, address: str) -> chat_pb.GetWorkerStatusResponse:
    with grpc.insecure_channel(address) as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        return stub.GetWorkerStatus(chat_pb.GetWorkerStatusRequest(), timeout=5, metadata=auth(stack))


def auth(stack: RunningStack) -> tuple[tuple[str, str], ...]:
    """Direct gRPC calls carry the services' internal token, as the edge's do."""
    return token_metadata(stack.internal_token)


def registry_session(stack: RunningStack, session_id: str, key: str) -> reg_pb.Session:
    """The session as the registry has it (a look-up restarts its idle timer)."""
    with grpc.insecure_channel(stack.addresses["registry"]) as channel:
        stub = reg_grpc.SessionRegistryServiceStub(channel)
        request = reg_pb.GetSessionRequest(id=session_id, api_key_hash=api_key_hash(key))
        return stub.GetSession(request, metadata=auth(stack))


def session_worker(stack: RunningStack, session_id: str, key: str) -> str:
    """The worker of the session's most recent request."""
    return registry_session(stack, session_id, key).worker_address


# -- on the shared stack (sessions enabled, two workers) ------------------------------------------------------------


def test_follow_up_turn_reuses_the_whole_conversation(stack):
    client = session_client(stack)
    # An opening no earlier test sent (the shared stack reuses any conversation whose text matches): the first turn
    # must find nothing but, at most, the chat template's first tokens.
    opening = {"role": "system", "content": f"{uuid.uuid4()}. {SYSTEM['content']}"}
    messages = [opening, {"role": "user", "content": QUESTIONS[0]}]
    raw1, first = turn(client, messages)
    assert raw1.headers["x-ark-session"] == "new"
    set_cookie = raw1.headers["set-cookie"]
    assert set_cookie.startswith(f"{COOKIE}=") and "Max-Age=86400" in set_cookie and "Path=/" in set_cookie
    assert "SameSite=lax" in set_cookie and "HttpOnly" in set_cookie and "Secure" not in set_cookie
    assert first.usage.prompt_tokens_details.cached_tokens < 8
    session_id = cookie_of(client)
    assert uuid.UUID(session_id).version == 4

    messages.append({"role": "user", "content": QUESTIONS[1]})
    raw2, second = turn(client, messages)
    assert raw2.headers["x-ark-session"] == "resumed" and "set-cookie" not in raw2.headers
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert "Berlin" in second.choices[0].message.content

    messages.append({"role": "user", "content": QUESTIONS[2]})
    _, third = turn(client, messages)
    assert third.usage.prompt_tokens - third.usage.prompt_tokens_details.cached_tokens < 20
    assert cookie_of(client) == session_id


def test_answers_with_a_session_equal_answers_without(stack):
    with_session = session_client(stack)
    messages = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    for question in QUESTIONS[1:]:
        turn(with_session, messages)
        messages.append({"role": "user", "content": question})
    _, last = turn(with_session, messages)
    assert last.usage.prompt_tokens_details.cached_tokens > 0
    # The same history sent fresh each time (no cookie jar: every request is a new session, fully computed).
    stateless = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    fresh = stateless.chat.completions.create(model="gpt-4o", messages=messages[:-1], temperature=0, max_tokens=48)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0 or fresh.usage.prompt_tokens > 0
    assert fresh.choices[0].message.content == last.choices[0].message.content


def test_streamed_turns_report_cached_tokens(stack):
    client = session_client(stack)
    messages = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    turn(client, messages)
    messages.append({"role": "user", "content": QUESTIONS[1]})
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            temperature=0,
            max_tokens=48,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("presented", ["unknown", "malformed", "foreign"])
def test_bad_cookies_are_replaced_never_adopted(stack, presented):
    owner = session_client(stack, stack.other_api_key)
    # An opening no conversation of the caller's key shares: whatever it reuses could only be the owner's.
    opening = [{"role": "system", "content": f"{uuid.uuid4()}. {SYSTEM['content']}"}]
    turn(owner, [*opening, {"role": "user", "content": QUESTIONS[0]}])
    values = {"unknown": str(uuid.uuid4()), "malformed": "not-a-session", "foreign": cookie_of(owner)}
    value = values[presented]
    client = session_client(stack)
    present(client, value)
    raw, completion = turn(client, [*opening, {"role": "user", "content": QUESTIONS[0]}])
    assert raw.headers["x-ark-session"] == "new"
    new_id = cookie_of(client)
    assert new_id != value and uuid.UUID(new_id).version == 4
    # Never the owner's state (its whole prompt matches): at most the chat template's first tokens, which every
    # conversation of the caller's own key starts with.
    assert completion.usage.prompt_tokens_details.cached_tokens < 8
    # The owner's session is untouched and still theirs.
    if presented == "foreign":
        assert owner.get("/sessions/current", cast_to=httpx.Response).json()["id"] == value
        response = client.get("/sessions/current", cast_to=httpx.Response).json()
        assert response["id"] == new_id


def placed_conversations(stack: RunningStack) -> dict[str, int]:
    with grpc.insecure_channel(stack.addresses["registry"]) as channel:
        stub = reg_grpc.SessionRegistryServiceStub(channel)
        workers = stub.ListWorkers(reg_pb.ListWorkersRequest(), metadata=auth(stack)).workers
    return {w.address: w.placed_sessions for w in workers}


def test_conversations_of_one_session_spread_over_the_workers_by_load(stack):
    client = session_client(stack)  # one cookie, as an app with one global client sends for all its users
    placed = placed_conversations(stack)
    assert set(placed) == {stack.addresses["chat-1"], stack.addresses["chat-2"]}
    # Each new conversation goes to the least loaded worker: after at most the current imbalance + 2 of them,
    # both workers hold some.
    used = set()
    for i in range(abs(placed[stack.addresses["chat-1"]] - placed[stack.addresses["chat-2"]]) + 2):
        turn(client, [SYSTEM, {"role": "user", "content": f"User {i}: {QUESTIONS[0]}"}], max_tokens=4)
        used.add(session_worker(stack, cookie_of(client), stack.api_key))
    assert used == {stack.addresses["chat-1"], stack.addresses["chat-2"]}


def test_without_cookies_a_conversation_stays_on_its_worker(stack):
    """curl, the Node SDK, apps that strip cookies: placement by content still brings each turn to its state."""
    stateless = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    messages = [SYSTEM, {"role": "user", "content": f"{uuid.uuid4()}: {QUESTIONS[0]}"}]
    workers = []
    for question in QUESTIONS[1:]:
        raw = stateless.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages, temperature=0, max_tokens=8
        )
        workers.append(raw.headers["x-ark-worker"])
        messages += [{"role": "assistant", "content": raw.parse().choices[0].message.content}]
        messages.append({"role": "user", "content": question})
    assert len(set(workers)) == 1


async def test_concurrent_requests_in_one_session_are_serialised(stack):
    client = session_client(stack)
    messages = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    turn(client, messages)
    messages.append({"role": "user", "content": QUESTIONS[1]})
    cookies = {COOKIE: cookie_of(client)}
    async with httpx.AsyncClient(base_url=stack.base_url, cookies=cookies, timeout=120) as http:
        body = {"model": "gpt-4o", "messages": messages, "temperature": 0, "max_tokens": 16}
        headers = {"authorization": f"Bearer {stack.api_key}"}
        responses = await asyncio.gather(
            *(http.post("/chat/completions", json=body, headers=headers) for _ in range(3))
        )
    seen = [(r.status_code, r.headers.get("x-ark-session"), r.text[:200]) for r in responses]
    assert all(r.status_code == 200 and r.headers["x-ark-session"] == "resumed" for r in responses), seen
    answers = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert len(answers) == 1  # one after the other on the same state: no interleaving, same greedy answer


def test_inspect_and_end_the_session(stack):
    client = session_client(stack)
    turn(client, [SYSTEM, {"role": "user", "content": QUESTIONS[0]}])
    session_id = cookie_of(client)
    worker = session_worker(stack, session_id, stack.api_key)
    current = client.get("/sessions/current", cast_to=httpx.Response)
    assert current.status_code == 200 and current.json()["id"] == session_id
    resident_before = worker_status(stack, worker).resident_sessions
    ended = client.delete("/sessions/current", cast_to=httpx.Response)
    assert ended.json() == {"id": session_id, "object": "session.deleted", "deleted": True}
    assert "Max-Age=0" in ended.headers["set-cookie"]
    assert worker_status(stack, worker).resident_sessions == resident_before - 1
    gone = httpx.get(
        f"{stack.base_url}/sessions/current",
        cookies={COOKIE: session_id},
        headers={"authorization": f"Bearer {stack.api_key}"},
    )
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_not_found"


# -- stacks with their own configuration ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_stack(tmp_path_factory):
    """Idle timeout of 15 s, for expiry (longer than a turn takes on a busy 2-core machine); also used (last) for
    failure tests that kill processes."""
    running = start_stack(tmp_path_factory.mktemp("short"), extra_env={"ARK__SESSIONS__IDLE_TIMEOUT_SECONDS": "15"})
    yield running
    running.stop()


def test_idle_expiry_frees_the_workers_state(short_stack):
    client = session_client(short_stack)
    turn(client, [SYSTEM, {"role": "user", "content": QUESTIONS[0]}])
    session_id = cookie_of(client)
    session = registry_session(short_stack, session_id, short_stack.api_key)
    worker = session.worker_address
    assert worker_status(short_stack, worker).resident_sessions == 1
    deadline = time.monotonic() + 60
    while worker_status(short_stack, worker).resident_sessions and time.monotonic() < deadline:
        time.sleep(0.5)
    assert worker_status(short_stack, worker).resident_sessions == 0
    # The worker may free idle state on its own clock a little before the registry ends the session: wait for that.
    while time.time() < session.expire_time.ToSeconds() + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    raw, _ = turn(client, [SYSTEM, {"role": "user", "content": QUESTIONS[0]}])
    assert raw.headers["x-ark-session"] == "new" and cookie_of(client) != session_id


def test_killed_worker_mid_conversation_is_replaced(short_stack):
    client = session_client(short_stack)
    messages = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    turn(client, messages)
    old_id = cookie_of(client)
    worker = session_worker(short_stack, old_id, short_stack.api_key)
    short_stack.kill(next(k for k, v in short_stack.addresses.items() if v == worker))
    messages.append({"role": "user", "content": QUESTIONS[1]})
    raw, completion = turn(client, messages)
    assert raw.headers["x-ark-session"] == "new" and cookie_of(client) != old_id
    assert "Berlin" in completion.choices[0].message.content
    assert session_worker(short_stack, cookie_of(client), short_stack.api_key) != worker


def test_registry_down_serves_statelessly_without_cookie(short_stack):
    short_stack.kill("registry")
    client = session_client(short_stack)
    raw, completion = turn(client, [SYSTEM, {"role": "user", "content": QUESTIONS[0]}])
    assert "Paris" in completion.choices[0].message.content
    assert "set-cookie" not in raw.headers and "x-ark-session" not in raw.headers


def test_sessions_switched_off_never_set_a_cookie(tmp_path_factory):
    running = start_stack(tmp_path_factory.mktemp("off"), chat_workers=1, extra_env={"ARK__SESSIONS__ENABLED": "false"})
    try:
        client = session_client(running)
        present(client, str(uuid.uuid4()))
        messages = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
        raw1, _ = turn(client, messages)
        messages.append({"role": "user", "content": QUESTIONS[1]})
        raw2, _ = turn(client, messages)
        for raw in (raw1, raw2):
            assert "set-cookie" not in raw.headers and "x-ark-session" not in raw.headers
        with pytest.raises(openai.NotFoundError) as info:
            client.get("/sessions/current", cast_to=httpx.Response)
        assert info.value.body["code"] == "session_not_found"
    finally:
        assert running.stop() == 0
