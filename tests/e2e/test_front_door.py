"""The front door: Envoy in front of the edge, metrics, the local rate limit and the graceful drain, on the real stack.

The shared stack (conftest) serves the checks that change nothing; the rate limit and the drain get stacks of their
own (chat model only, to start fast), since one lowers a limit and the other ends its stack.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.common.config import DEFAULT_CONFIG_PATH
from tests.support.stack import RunningStack, start_stack

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Say hello."}]
# SmolLM2's end-of-text, start-of-turn and end-of-turn tokens: banned, the model writes until max_tokens.
NEVER_STOP = {"0": -100, "1": -100, "2": -100}


def auth(stack: RunningStack) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.api_key}"}


def chat_only_config(tmp_path: Path, *, threads: int | None = None) -> Path:
    """The default configuration with only the chat model, for stacks that need nothing else."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["models"] = [m for m in raw["models"] if m["capability"] == "chat"]
    if threads is not None:
        raw["models"][0]["settings"]["n_threads"] = threads
    path = tmp_path / "ark-chat-only.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def scrape(url: str) -> dict[str, list]:
    """Samples by metric family name."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, url
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def total(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# -- through the shared stack -------------------------------------------------------------------------------------


def test_the_public_port_is_envoy(stack, client):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert raw.headers["server"] == "envoy"
    assert "x-envoy-upstream-service-time" in raw.headers
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith("req_"), "the edge's request id, not one made up by Envoy"
    # One JSON access-log line per request, carrying that id.
    deadline = time.monotonic() + 10
    while request_id not in stack.log("envoy") and time.monotonic() < deadline:
        time.sleep(0.2)
    line = next(line for line in stack.log("envoy").splitlines() if request_id in line)
    entry = json.loads(line)
    assert entry["path"] == "/v1/chat/completions" and entry["status"] == 200 and entry["method"] == "POST"


def test_the_edge_stays_reachable_behind_envoy(stack):
    response = httpx.get(f"{stack.edge_url}/v1/models", headers=auth(stack))
    assert response.status_code == 200 and response.headers.get("server") != "envoy"
    assert httpx.get(f"{stack.edge_url}/ready").status_code == 200


def test_envoy_answers_unknown_paths_in_openais_envelope_and_keeps_metrics_internal(stack):
    for path in ("/nothing", "/metrics"):
        response = httpx.get(f"{stack.root_url}{path}")
        assert response.status_code == 404
        assert response.json() == {
            "error": {
                "message": f"Invalid URL (GET {path})",
                "type": "invalid_request_error",
                "param": None,
                "code": "unknown_url",
            }
        }
    assert httpx.get(f"{stack.root_url}/ready").status_code == 200


def test_a_long_stream_outlives_envoys_default_route_timeout(stack, client):
    """Envoy's default route timeout (15 s) would cut this stream; ARK's route has none, only an idle timeout."""
    started = time.monotonic()
    last_chunk_at, chunks = 0.0, 0
    with client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
        max_tokens=4096,
        logit_bias=NEVER_STOP,
        stream=True,
    ) as stream:
        for chunk in stream:
            chunks += 1
            last_chunk_at = time.monotonic() - started
            assert chunk.choices and chunk.choices[0].finish_reason is None
            if last_chunk_at > 17:
                break  # closing the stream aborts the generation
    assert last_chunk_at > 17 and chunks > 20


def test_metrics_are_scraped_from_the_edge_and_every_service(stack, client):
    stream = client.chat.completions.create(
        model="gpt-4o", messages=HELLO, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    assert [chunk for chunk in stream]
    client.embeddings.create(model="text-embedding-3-small", input=["one", "two", "three"])

    edge = scrape(stack.metrics_url("edge"))
    requests = edge["ark_http_requests"]
    assert total(requests, "ark_http_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert total(requests, "ark_http_requests_total", route="/v1/embeddings", status="200") >= 1
    assert total(edge["ark_http_request_duration_seconds"], "ark_http_request_duration_seconds_count") >= 2
    model = {"model": "smollm2-135m-instruct"}
    assert total(edge["ark_chat_time_to_first_token_seconds"], "ark_chat_time_to_first_token_seconds_count", **model)
    assert total(edge["ark_chat_decode_tokens_per_second"], "ark_chat_decode_tokens_per_second_count", **model)
    assert total(edge["ark_chat_completion_tokens"], "ark_chat_completion_tokens_total", **model) >= 8
    assert total(edge["ark_chat_cached_token_ratio"], "ark_chat_cached_token_ratio_count", **model) >= 1
    assert "ark_chat_cached_prompt_tokens" in edge and "ark_edge_draining" in edge

    generated = 0.0
    for worker in ("chat-1", "chat-2"):
        chat = scrape(stack.metrics_url(worker))
        assert {"ark_chat_queue_depth", "ark_chat_resident_sessions", "ark_chat_session_capacity"} <= chat.keys()
        generated += total(chat["ark_grpc_requests"], "ark_grpc_requests_total", method="StreamGenerateChatCompletion")
    assert generated >= 1

    embeddings = scrape(stack.metrics_url("embeddings"))
    assert total(embeddings["ark_embeddings_batch_size"], "ark_embeddings_batch_size_count") >= 1
    assert total(embeddings["ark_grpc_requests"], "ark_grpc_requests_total", method="Embed", code="OK") >= 1
    for service in ("registry", "transcription"):
        samples = scrape(stack.metrics_url(service))["ark_grpc_requests"]
        assert total(samples, "ark_grpc_requests_total", method="Check", code="OK") >= 1, service


# -- a stack with a low rate limit --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_stack(tmp_path_factory) -> Iterator[RunningStack]:
    tmp = tmp_path_factory.mktemp("limited")
    running = start_stack(
        tmp / "logs",
        chat_workers=1,
        extra_env={
            "ARK_CONFIG": str(chat_only_config(tmp)),
            "ARK__SESSIONS__ENABLED": "false",
            "ARK__ENVOY__RATE_LIMIT__BURST": "3",
            "ARK__ENVOY__RATE_LIMIT__REQUESTS_PER_FILL": "1",
            "ARK__ENVOY__RATE_LIMIT__FILL_INTERVAL_SECONDS": "60",
        },
    )
    yield running
    assert running.stop() == 0


def test_the_rate_limit_answers_429_in_openais_envelope(limited_stack):
    client = openai.OpenAI(base_url=limited_stack.base_url, api_key=limited_stack.api_key, max_retries=0)
    for _ in range(3):
        client.models.list()
    with pytest.raises(openai.RateLimitError) as info:
        client.models.list()
    assert info.value.status_code == 429
    assert info.value.body == {
        "message": "Rate limit reached for requests. Retry after the time in Retry-After.",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert info.value.response.headers["retry-after"] == "60"
    assert info.value.response.headers["content-type"] == "application/json"
    # Probes are not rate limited.
    assert httpx.get(f"{limited_stack.root_url}/health").status_code == 200


# -- the drain ----------------------------------------------------------------------------------------------------

DRAIN_GRACE = 15
LONG_TOKENS = 8000  # with the model's 8192-token context: longer than the grace at this machine's speed


class Stream:
    """An SSE chat stream read on its own thread: every event, and when the first one arrived."""

    def __init__(self, stack: RunningStack, max_tokens: int) -> None:
        self.events: list[str] = []
        self.first = threading.Event()
        self.done = threading.Event()
        self.ended_at = 0.0
        body = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": max_tokens,
            "logit_bias": NEVER_STOP,
            "stream": True,
        }
        self._thread = threading.Thread(target=self._read, args=(stack, body), daemon=True)
        self._thread.start()

    def _read(self, stack: RunningStack, body: dict) -> None:
        try:
            with httpx.stream(
                "POST", f"{stack.base_url}/chat/completions", json=body, headers=auth(stack), timeout=120
            ) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line.removeprefix("data: "))
                        self.first.set()
        finally:
            self.ended_at = time.monotonic()
            self.first.set()
            self.done.set()


def test_sigterm_drains_then_frees_every_port(tmp_path):
    stack = start_stack(
        tmp_path / "logs",
        extra_env={
            # One thread per worker: the two streams below run side by side at the speed measured alone.
            "ARK_CONFIG": str(chat_only_config(tmp_path, threads=1)),
            "ARK__SESSIONS__ENABLED": "false",
            "ARK__EDGE__DRAIN_GRACE_SECONDS": str(DRAIN_GRACE),
            "ARK__LIMITS__MAX_TOKENS": str(LONG_TOKENS),
        },
    )
    try:
        client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=120)
        for _ in range(2):  # one request per worker: a worker's first generation is slow
            client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=8, logit_bias=NEVER_STOP)
        # This machine's decode speed decides how long "short" is: about two seconds of tokens.
        began = time.monotonic()
        warm = client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=48, logit_bias=NEVER_STOP)
        rate = warm.usage.completion_tokens / (time.monotonic() - began)
        assert LONG_TOKENS / rate > DRAIN_GRACE + 5, f"{rate:.0f} tokens/s: the long stream would end within the grace"
        short, long = Stream(stack, max_tokens=max(8, int(rate * 2))), Stream(stack, max_tokens=LONG_TOKENS)
        assert short.first.wait(60) and long.first.wait(60)

        stack.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while httpx.get(f"{stack.edge_url}/ready").status_code == 200 and time.monotonic() < signalled + 5:
            time.sleep(0.02)
        draining_since = time.monotonic()

        # Draining: not ready (at the edge and through Envoy), still alive, new requests refused with Retry-After.
        assert httpx.get(f"{stack.edge_url}/ready").status_code == 503
        assert httpx.get(f"{stack.root_url}/ready").status_code == 503
        assert httpx.get(f"{stack.edge_url}/health").status_code == 200
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "server_shutting_down" and info.value.body["type"] == "server_error"
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.response.headers["x-request-id"].startswith("req_")

        # The short stream, in flight when the drain began, finishes normally within the grace.
        assert short.done.wait(DRAIN_GRACE)
        assert short.ended_at > draining_since, "the short stream ended before the drain began"
        assert short.events[-1] == "[DONE]", short.events[-2:]
        assert json.loads(short.events[-2])["choices"][0]["finish_reason"] == "length"

        # The long one is ended at the grace with an error event, and no [DONE].
        assert long.done.wait(DRAIN_GRACE + 10)
        assert long.ended_at - signalled >= DRAIN_GRACE - 1
        last = json.loads(long.events[-1])
        assert last["error"]["code"] == "server_shutting_down" and last["error"]["type"] == "server_error"
        assert "[DONE]" not in long.events
    finally:
        code = stack.stop()  # raises if any port stays bound
    assert code == 0
