"""Sessions in the scaled topology: three edges behind Envoy's round robin, two registries on one Redis-protocol
store, two chat workers on the embedded model, driven by the official client keeping its cookie.

What a user would notice: every turn of a conversation is served by the worker holding its state (x-ark-worker) and
reports the reuse (cached_tokens), whichever edge and registry handled it; killing or restarting registries loses
nothing; a store outage serves requests statelessly, then sessions resume; a restarted worker's old placements are
not trusted (a new epoch), and the conversation carries on.
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from edge.sessions.headers import worker_id
from edge.sessions.placement import Placement
from tests.support.scaled_stack import ScaledStack, start_scaled_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}
COOKIE = "ark_session_id"


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> ScaledStack:
    stack = start_scaled_stack(tmp_path_factory.mktemp("scaled"))
    yield stack
    stack.stop_all()


def session_client(stack: ScaledStack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.base_url, api_key=stack.api_key, max_retries=0, http_client=httpx.Client(timeout=120)
    )


def turn(client: openai.OpenAI, messages: list[dict], text: str):
    messages.append({"role": "user", "content": text})
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=messages, temperature=0, max_tokens=12
    )
    completion = raw.parse()
    messages.append({"role": "assistant", "content": completion.choices[0].message.content})
    return raw, completion


def worker_header(name: str, epoch: int) -> str:
    """What x-ark-worker says for this worker incarnation."""
    return worker_id(Placement("", name, name, epoch, "", "", False))


def cookie_of(client: openai.OpenAI) -> str | None:
    return client._client.cookies.get(COOKIE)


def edge_chat_requests(stack: ScaledStack) -> dict[str, float]:
    """Chat requests each edge answered, from its own /metrics."""
    counts = {}
    for name in stack.names("edge-"):
        text = httpx.get(f"http://{stack.processes[name].address}/metrics", timeout=5).text
        counts[name] = sum(
            float(m.group(1))
            for m in re.finditer(
                r'^ark_http_requests_total\{[^}]*route="/v1/chat/completions"[^}]*\} (\S+)$', text, re.M
            )
        )
    return counts


def edges_find_session(stack: ScaledStack, cookie: str) -> bool:
    """Every edge, asked directly, finds the session (`GET /v1/sessions/current`): it reaches a registry."""
    for name in stack.names("edge-"):
        response = httpx.get(
            f"http://{stack.processes[name].address}/v1/sessions/current",
            cookies={COOKIE: cookie},
            headers={"authorization": f"Bearer {stack.api_key}"},
            timeout=5,
        )
        if response.status_code != 200:
            return False
    return True


def test_ten_turns_through_three_edges_stay_on_one_worker_and_report_reuse(scaled):
    before = edge_chat_requests(scaled)
    client = session_client(scaled)
    messages = [SYSTEM]
    workers, cached, sessions = [], [], []
    for i in range(10):
        raw, completion = turn(client, messages, f"Question {i + 1}: name a colour.")
        workers.append(raw.headers["x-ark-worker"])
        sessions.append(raw.headers["x-ark-session"])
        cached.append(completion.usage.prompt_tokens_details.cached_tokens)
    assert sessions == ["new"] + ["resumed"] * 9
    wrong_worker_turns = sum(w != workers[0] for w in workers)
    assert wrong_worker_turns == 0, workers
    assert all(c > 0 for c in cached[1:]), cached
    served = {e: n - before[e] for e, n in edge_chat_requests(scaled).items()}
    assert sum(served.values()) == 10 and sum(n > 0 for n in served.values()) == 3, served  # round robin


def test_a_registry_killed_mid_conversation_loses_nothing(scaled):
    client = session_client(scaled)
    messages = [SYSTEM]
    raw, _ = turn(client, messages, "Name a fruit.")
    cookie, worker = cookie_of(client), raw.headers["x-ark-worker"]
    scaled.processes["registry-1"].kill()
    try:
        for question in ("Name another.", "And a vegetable?", "And a tree?"):
            raw, completion = turn(client, messages, question)
            assert raw.headers["x-ark-session"] == "resumed" and raw.headers["x-ark-worker"] == worker
            assert completion.usage.prompt_tokens_details.cached_tokens > 0
        assert cookie_of(client) == cookie
    finally:
        scaled.start("registry-1")
        scaled.wait_ready()


def test_sessions_survive_both_registries_restarting(scaled):
    client = session_client(scaled)
    messages = [SYSTEM]
    raw, _ = turn(client, messages, "Name a river.")
    cookie, worker = cookie_of(client), raw.headers["x-ark-worker"]
    for name in scaled.names("registry-"):
        scaled.processes[name].stop()
    for name in scaled.names("registry-"):
        scaled.start(name)
    scaled.wait_ready()
    # Each edge's channel reconnects to the registries within its reconnect backoff (at most 2 s); until then a
    # request would be served statelessly. Wait until every edge finds the session again.
    scaled.wait_until(lambda: edges_find_session(scaled, cookie), "the edges to reach the registries again")
    raw, completion = turn(client, messages, "Name another.")
    assert raw.headers["x-ark-session"] == "resumed" and cookie_of(client) == cookie
    assert raw.headers["x-ark-worker"] == worker
    assert completion.usage.prompt_tokens_details.cached_tokens > 0


def test_a_stopped_store_serves_statelessly_then_sessions_resume(scaled):
    client = session_client(scaled)
    messages = [SYSTEM]
    raw, _ = turn(client, messages, "Name a mountain.")
    cookie, worker = cookie_of(client), raw.headers["x-ark-worker"]
    scaled.store.stop()
    try:
        raw, completion = turn(client, messages, "Name another.")
        assert raw.status_code == 200 and completion.choices[0].message.content
        assert "set-cookie" not in raw.headers and "x-ark-session" not in raw.headers  # stateless, cookie kept
        assert cookie_of(client) == cookie
    finally:
        scaled.store.start()
    scaled.wait_ready()  # workers renew their leases with the store back
    raw, completion = turn(client, messages, "And a lake?")
    assert raw.headers["x-ark-session"] == "resumed" and cookie_of(client) == cookie
    assert raw.headers["x-ark-worker"] == worker
    fallbacks = sum(
        float(v)
        for name in scaled.names("edge-")
        for v in re.findall(
            r"^ark_session_stateless_fallbacks_total (\S+)$",
            httpx.get(f"http://{scaled.processes[name].address}/metrics", timeout=5).text,
            re.M,
        )
    )
    assert fallbacks >= 1


def test_a_restarted_worker_is_a_new_epoch_and_its_placements_are_redone(scaled):
    client = session_client(scaled)
    messages = [SYSTEM]
    raw, _ = turn(client, messages, "Name a city.")
    old = raw.headers["x-ark-worker"]

    def serving() -> list[tuple[str, int]]:
        return [(w.name, w.epoch) for w in scaled.live_workers() if worker_header(w.name, w.epoch) == old]

    # The registries' list is read once they answer it again (an earlier test restarted their store).
    scaled.wait_until(lambda: bool(serving()), "the serving worker among the registry's live workers")
    [(name, epoch)] = serving()
    process = next(p for p in scaled.processes.values() if p.address == name)
    process.kill()
    process.start()
    scaled.wait_until(
        lambda: any(w.name == name and w.epoch == epoch + 1 for w in scaled.live_workers()), "the new incarnation"
    )
    scaled.wait_ready()  # and the edges' health probes see it serve again
    raw, completion = turn(client, messages, "Name another.")
    assert raw.status_code == 200 and completion.choices[0].message.content
    assert raw.headers["x-ark-worker"] != old  # never the dead incarnation
    new = raw.headers["x-ark-worker"]
    raw, completion = turn(client, messages, "And a country?")
    assert raw.headers["x-ark-worker"] == new  # and then it stays where it went
    assert completion.usage.prompt_tokens_details.cached_tokens > 0


def edge_client(stack: ScaledStack, edge: str) -> openai.OpenAI:
    """The official client talking to one edge directly (not through Envoy's round robin)."""
    base_url = f"http://{stack.processes[edge].address}/v1"
    return openai.OpenAI(base_url=base_url, api_key=stack.api_key, max_retries=0, timeout=120)


def test_a_stored_response_chain_survives_restarting_every_edge_and_registry(scaled):
    first_edge, second_edge = scaled.names("edge-")[:2]
    client = edge_client(scaled, first_edge)
    first = client.responses.create(model="gpt-4o", input="Name a river.", max_output_tokens=12, temperature=0)
    for name in [*scaled.names("edge-"), *scaled.names("registry-")]:
        scaled.processes[name].stop()
    for name in [*scaled.names("registry-"), *scaled.names("edge-")]:
        scaled.start(name)
    scaled.wait_ready()
    other = edge_client(scaled, second_edge)
    scaled.wait_until(lambda: _readable(other, first.id), "an edge to read the stored response again")
    assert other.responses.retrieve(first.id).output_text == first.output_text
    second = other.responses.create(
        model="gpt-4o", previous_response_id=first.id, input="Name another.", max_output_tokens=12, temperature=0
    )
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached >= first.usage.input_tokens + first.usage.output_tokens - 2


def _readable(client: openai.OpenAI, response_id: str) -> bool:
    try:
        client.responses.retrieve(response_id)
        return True
    except (openai.APIConnectionError, openai.InternalServerError):
        return False


def test_a_background_response_whose_edge_is_killed_ends_failed(scaled):
    runner, reader = scaled.names("edge-")[:2]
    queued = edge_client(scaled, runner).responses.create(
        model="gpt-4o", input="Write a very long essay about rivers.", background=True, max_output_tokens=4000
    )
    other = edge_client(scaled, reader)
    scaled.wait_until(lambda: other.responses.retrieve(queued.id).status == "in_progress", "the response to start")
    scaled.processes[runner].kill()
    try:
        scaled.wait_until(lambda: other.responses.retrieve(queued.id).status == "failed", "the response to fail", 120)
        failed = other.responses.retrieve(queued.id)
        assert failed.error is not None and "stopped" in failed.error.message
    finally:
        scaled.start(runner)
        scaled.wait_ready()
