"""Routing by load on the real stack (two llama.cpp workers): a worker kept busy by another edge's long generations
gets no new stateless stream while the other has room (edge/clients/worker_load.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from ark.chat.v1 import chat_service_pb2 as chat_pb
from ark.chat.v1 import chat_service_pb2_grpc as chat_grpc
from services.common.internal_auth import token_metadata
from tests.support.stack import RunningStack

MODEL = "smollm2-135m-instruct"
STORY = "Write a very long story about a lighthouse keeper and the storms of one winter, chapter by chapter."


def _sample(url: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _generations_ended(stack: RunningStack, worker: str) -> float:
    """Generation calls the worker has finished (ended or cancelled) since it started."""
    url = stack.metrics_url(worker)
    return _sample(url, "ark_grpc_request_duration_seconds_count", method="StreamGenerateChatCompletion")


@contextlib.contextmanager
def _long_generations_on(stack: RunningStack, address: str, count: int) -> Iterator[None]:
    """`count` long generations sent to the worker directly, as another edge would, cancelled on exit."""
    channel = grpc.insecure_channel(address)
    stub = chat_grpc.ChatServiceStub(channel)
    calls = [
        stub.StreamGenerateChatCompletion(
            chat_pb.StreamGenerateChatCompletionRequest(
                request_id=f"req_other_edge_{i}_{time.monotonic_ns()}",
                model=MODEL,
                messages=[chat_pb.ChatMessage(role=chat_pb.ROLE_USER, content=f"{STORY} ({i})")],
                sampling=chat_pb.SamplingParams(max_tokens=3000, temperature=0.8, seed=i),
            ),
            metadata=token_metadata(stack.internal_token),
        )
        for i in range(count)
    ]

    def drain(call: grpc.Call) -> None:
        with contextlib.suppress(grpc.RpcError):
            for _ in call:
                pass

    for call in calls:
        threading.Thread(target=drain, args=(call,), daemon=True).start()
    try:
        yield
    finally:
        for call in calls:
            call.cancel()
        channel.close()


def test_new_stateless_streams_go_to_the_idle_worker_while_another_edge_keeps_the_other_busy(stack):
    busy, idle = "chat-1", "chat-2"
    with _long_generations_on(stack, stack.addresses[busy], 3):
        # This edge has no call of its own on either worker; its probes bring the busy one's report.
        deadline = time.monotonic() + 30
        edge = stack.metrics_url("edge")
        while _sample(edge, "ark_chat_worker_requests", worker=stack.addresses[busy]) < 2:
            assert time.monotonic() < deadline, "the edge never saw the busy worker's load"
            time.sleep(0.1)
        before = {w: _generations_ended(stack, w) for w in (busy, idle)}
        with openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=120) as client:
            streams = []
            for i in range(2):
                stream = client.chat.completions.create(
                    model="gpt-4o",
                    messages=[{"role": "user", "content": f"{STORY} [{i}]"}],
                    max_tokens=400,
                    stream=True,
                    extra_body={"session": "none"},
                )
                next(iter(stream))  # started on its worker
                streams.append(stream)
            for stream in streams:
                stream.close()
        deadline = time.monotonic() + 30
        while _generations_ended(stack, idle) < before[idle] + 2:
            assert time.monotonic() < deadline, "the two streams did not both end on the idle worker"
            time.sleep(0.1)
        # Both went to the idle worker: round robin, or this edge's own calls alone, would have put one on the busy.
        assert _generations_ended(stack, busy) == before[busy]
