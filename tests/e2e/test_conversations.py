"""Many conversations through one default client: the shape real applications have (one global `OpenAI()` serving
many users sends one cookie for all of them). Real model, real stack, the official client as configured by default.
"""

from __future__ import annotations

import uuid

import grpc
import openai
import pytest

from ark.chat.v1 import chat_service_pb2 as chat_pb
from ark.chat.v1 import chat_service_pb2_grpc as chat_grpc
from services.common.internal_auth import token_metadata
from tests.support.stack import RunningStack

pytestmark = pytest.mark.e2e

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}


COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "pink", "gray"]


def user_context(i: int) -> str:
    """A distinct opening message per user, long enough that reuse is worth measuring.

    Plain words, not random strings: a state computed turn by turn and a prompt computed in one pass differ in the
    last bits of their floating point, which can flip a greedy choice between two nearly equal tokens (random hex
    is full of those); ordinary words leave clear winners."""
    facts = " ".join(f"Fact {k} of user {i}: box {k} is {COLORS[(i * 5 + k) % len(COLORS)]}." for k in range(12))
    return f"I am user {i} ({uuid.uuid4().hex[:6]}). Remember these facts. {facts} What is fact 1?"


def ask(client: openai.OpenAI, messages: list[dict]) -> tuple[str, dict, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=messages, temperature=0, max_tokens=12, extra_body={"ark_metadata": True}
    )
    body = raw.http_response.json()
    answer = body["choices"][0]["message"]["content"]
    messages.append({"role": "assistant", "content": answer})
    return answer, body, raw.headers.get("x-ark-worker", "")


def interleave(client: openai.OpenAI, users: int, turns: int) -> list[list[tuple[dict, str, list[dict]]]]:
    """`users` conversations, one turn each in round robin; per user, per turn: (response body, worker, prompt)."""
    conversations = [[SYSTEM, {"role": "user", "content": user_context(i)}] for i in range(users)]
    seen: list[list[tuple[dict, str, list[dict]]]] = [[] for _ in range(users)]
    for t in range(turns):
        for i, messages in enumerate(conversations):
            if t:
                messages.append({"role": "user", "content": f"And fact {t + 1}?"})
            prompt = [dict(m) for m in messages]
            _, body, worker = ask(client, messages)
            seen[i].append((body, worker, prompt))
    return seen


def test_one_default_client_many_users_every_later_turn_reuses_its_conversation(stack: RunningStack):
    client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)  # keeps cookies
    seen = interleave(client, users=6, turns=3)
    workers = {worker for turns in seen for _, worker, _ in turns}
    assert len(workers) == 2, "the conversations of one session spread over both workers"
    for turns in seen:
        assert len({worker for _, worker, _ in turns}) == 1, "each conversation stays on its worker"
        for body, _, _ in turns[1:]:
            usage = body["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] >= 0.9 * usage["prompt_tokens"], usage


def test_more_conversations_than_resident_contexts_resume_from_the_tiers_with_the_same_answers(stack: RunningStack):
    client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    resident = 0  # resident conversations the workers hold together
    for name, address in stack.addresses.items():
        if name.startswith("chat-") and not name.endswith("-metrics"):
            with grpc.insecure_channel(address) as channel:
                status = chat_grpc.ChatServiceStub(channel).GetWorkerStatus(
                    chat_pb.GetWorkerStatusRequest(), timeout=5, metadata=token_metadata(stack.internal_token)
                )
            resident += status.session_capacity
    seen = interleave(client, users=resident + 4, turns=2)
    tiers = {body["ark"]["state_tier"] for turns in seen for body, _, _ in turns[1:]}
    assert tiers & {"host", "disk"}, tiers  # more conversations than resident sequences: some were saved
    stateless = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    for turns in seen[:3]:
        body, _, prompt = turns[1]
        raw = stateless.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=prompt, temperature=0, max_tokens=12, extra_body={"session": "none"}
        )
        # Stripped: after the answer's last word, ending the text and a blank line are the near tie the module
        # docstring speaks of (a state computed turn by turn against a prompt computed in one pass).
        assert raw.parse().choices[0].message.content.strip() == body["choices"][0]["message"]["content"].strip()


def test_another_api_key_never_reuses_a_conversation(stack: RunningStack):
    first = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    messages = [SYSTEM, {"role": "user", "content": user_context(99)}]
    ask(first, messages)
    messages.append({"role": "user", "content": "And fact 2?"})
    other_key = stack.other_api_key
    second = openai.OpenAI(base_url=stack.base_url, api_key=other_key, max_retries=0)
    _, body, _ = ask(second, [dict(m) for m in messages])
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
