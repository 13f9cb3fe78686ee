"""The edge's chat worker pool against real gRPC chat servers in-process (the real servicer and generation layer;
a fake engine below them, which can hold its tokens): when a request moves to another worker, when it never does.

The same rules on real processes killed and stopped: tests/reliability/test_process_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
import pytest
from prometheus_client import REGISTRY

from ark.chat.v1 import chat_service_pb2 as pb
from edge.clients.chat_workers import ChatStream, ChatWorkers, WorkerPolicy
from services.chat.generator import Generator
from services.chat.servicer import chat_service
from services.common.errors import OverloadedError, QuarantinedRequestError, UnavailableError, WorkerFailedError
from services.common.server import create_server, mark_serving
from services.common.shutdown import ShutdownGuard
from tests.support.fake_engine import FakeEngine

pytestmark = pytest.mark.integration

POLICY = WorkerPolicy(probe_interval=0.1, probe_timeout=0.5, hang_after=1.0, first_event_timeout=10, event_timeout=10)


@dataclass
class Worker:
    address: str
    server: grpc.aio.Server
    engine: FakeEngine
    generator: Generator
    shutdown: ShutdownGuard


async def _worker(max_queue: int = 4) -> Worker:
    engine = FakeEngine()
    engine.hold = asyncio.Event()
    engine.hold.set()
    generator = Generator(engine, max_queue=max_queue)
    service = chat_service({"fake": generator})
    shutdown = ShutdownGuard()
    server, port, health = create_server([service], "127.0.0.1:0", shutdown=shutdown)
    await server.start()
    await mark_serving(health, [service.name])
    return Worker(f"127.0.0.1:{port}", server, engine, generator, shutdown)


@pytest.fixture
async def two_workers() -> AsyncIterator[tuple[Worker, Worker, ChatWorkers]]:
    a, b = await _worker(), await _worker()
    pool = ChatWorkers([a.address, b.address], POLICY)
    pool.start()
    yield a, b, pool
    await pool.close()
    for w in (a, b):
        w.engine.hold.set()
        await w.server.stop(None)


def _request(text: str) -> pb.StreamGenerateChatCompletionRequest:
    return pb.StreamGenerateChatCompletionRequest(
        request_id=f"req_{text}", model="fake", messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)]
    )


async def _text(pool: ChatWorkers, request: pb.StreamGenerateChatCompletionRequest) -> str:
    stream = await pool.open_stream(request)
    try:
        return "".join([m.delta.text async for m in stream if m.WhichOneof("event") == "delta"])
    finally:
        stream.cancel()


def _prompt(run) -> str:
    """The user's text in a fake engine's run (its tokens are the characters of the rendered prompt)."""
    rendered = "".join(map(chr, run.prompt))
    return rendered.split("<user>", 1)[1].split("\x01", 1)[0]


async def test_a_queued_request_moves_when_its_worker_dies_but_the_running_one_does_not(two_workers):
    a, b, pool = two_workers
    a.engine.hold.clear()  # a's generation stops after its first token
    running = await pool.open_stream(_request("first"))  # both idle, round robin: a
    b.engine.hold.clear()
    on_b = await pool.open_stream(_request("second"))  # the less loaded: b
    queued = asyncio.create_task(_text(pool, _request("third")))  # equally loaded, round robin: a, queued
    await asyncio.sleep(0.2)
    assert not queued.done()
    await a.server.stop(0)  # a dies
    b.engine.hold.set()
    assert "".join([m.delta.text async for m in on_b if m.WhichOneof("event") == "delta"]) == "Hello!"

    # The queued request never started there: it moved to b and was served.
    assert await asyncio.wait_for(queued, 10) == "Hello!"
    # The running one ends with worker_failed, not retried...
    with pytest.raises(WorkerFailedError) as info:
        async for _ in running:
            pass
    assert info.value.should_retry is False
    # ...and is refused for a while, wherever it would go.
    with pytest.raises(QuarantinedRequestError):
        await pool.open_stream(_request("first"))
    # The dead worker is out of rotation: every request now goes to b, at once.
    for i in range(3):
        assert await asyncio.wait_for(_text(pool, _request(f"after {i}")), 5) == "Hello!"
    # b ran the rest, "third" included, each once. a ran "first"; the stop cancels a's calls in no set order, so the
    # slot "first" freed may be handed to "third" before its own cancellation lands: if a's engine saw it at all, it
    # was aborted there and nothing of it reached the client (which got b's answer above).
    assert [_prompt(r) for r in b.engine.runs].count("third") == 1 and len(b.engine.runs) == 5
    assert _prompt(a.engine.runs[0]) == "first"
    assert all(_prompt(r) == "third" and r.abort.is_set() for r in a.engine.runs[1:])


async def test_a_stateless_request_goes_to_the_worker_with_the_fewest_calls(two_workers):
    a, b, pool = two_workers
    a.engine.hold.clear()
    long_one = await pool.open_stream(_request("long"))  # both idle, round robin: a, where it keeps running
    for i in range(4):  # round robin would send every other one to a, behind the long one
        assert await asyncio.wait_for(_text(pool, _request(f"short {i}")), 5) == "Hello!"
    assert len(a.engine.runs) == 1 and len(b.engine.runs) == 4
    long_one.cancel()


async def test_a_new_stream_goes_to_the_idle_worker_when_another_edge_keeps_the_other_busy(two_workers):
    a, b, other_edge = two_workers
    a.engine.hold.clear()
    b.engine.hold.clear()
    # Another edge (or this one before a restart) started a long generation on a: it runs there, held.
    long_one = await other_edge.open_stream(_request("long"), address=a.address)
    this_edge = ChatWorkers([a.address, b.address], POLICY)  # no call of its own anywhere
    this_edge.start()
    try:
        # Its probes bring the workers' own reports: a's one sequence is taken.
        deadline = asyncio.get_running_loop().time() + 10
        while this_edge._workers[a.address].load.requests(set()) < 1:
            assert asyncio.get_running_loop().time() < deadline, "no load report from a"
            await asyncio.sleep(0.05)
        # Where the registry is told to place a new conversation: b alone.
        soonest = this_edge.soonest()
        assert soonest == [b.address]
        this_edge.placed(soonest, None)  # not placed after all: its promise is withdrawn
        # Round robin, or this edge's own calls alone, would send it to a (first in turn), behind the long one.
        b.engine.hold.set()
        assert await asyncio.wait_for(_text(this_edge, _request("new")), 5) == "Hello!"
        assert len(a.engine.runs) == 1 and len(b.engine.runs) == 1
    finally:
        long_one.cancel()
        await this_edge.close()


async def test_a_continued_conversation_counts_where_the_registry_put_it(two_workers):
    # A burst mixing continued conversations (the registry sends each to the worker holding it) and new ones: each
    # placement counts on the worker the registry chose, so the new ones fill the other worker first.
    a, b, pool = two_workers
    placed = {a.address: 0, b.address: 0}
    for _ in range(3):  # three continued conversations held on a, whatever the edge proposed
        soonest = pool.soonest()
        pool.placed(soonest, a.address)
        placed[a.address] += 1
    for _ in range(5):  # five new users: the registry takes the edge's proposal
        soonest = pool.soonest()
        pool.placed(soonest, soonest[0])
        placed[soonest[0]] += 1
    assert placed == {a.address: 4, b.address: 4}
    for address, count in placed.items():
        assert pool._workers[address].load.requests(set()) == count
    for worker in pool._workers.values():  # the calls never start here: withdraw what this test promised
        while worker.load.requests(set()):
            worker.load.withdraw()


async def test_a_stateless_call_does_not_take_the_place_of_a_promised_conversation(two_workers):
    a, b, pool = two_workers
    a.engine.hold.clear()
    b.engine.hold.clear()
    for _ in range(2):  # a new conversation placed on each worker, its call not started yet
        pool.placed(soonest := pool.soonest(), soonest[0])
    stateless = await pool.open_stream(_request("stateless"))
    ran_it = next(w for w in (a, b) if w.engine.runs)
    worker = pool._workers[ran_it.address]
    assert worker.load.requests(worker.calls) == 2  # the stateless call and the conversation still to come
    stateless.cancel()
    for worker in pool._workers.values():  # the conversations never start here: withdraw what this test promised
        worker.load.withdraw()


@contextlib.asynccontextmanager
async def _two_busy_workers(
    overload_hold: float,
) -> AsyncIterator[tuple[ChatWorkers, ChatStream, ChatStream, asyncio.Event]]:
    """Two workers without a queue, each busy with one held generation: the pool, the two streams, and the event
    that lets the second worker's generation finish."""
    a, b = await _worker(max_queue=0), await _worker(max_queue=0)
    pool = ChatWorkers([a.address, b.address], replace(POLICY, overload_hold=overload_hold))
    try:
        a.engine.hold.clear()
        b.engine.hold.clear()
        on_a = await pool.open_stream(_request("one"))
        on_b = await pool.open_stream(_request("two"))
        yield pool, on_a, on_b, b.engine.hold
        on_a.cancel()
    finally:
        await pool.close()
        for w in (a, b):
            w.engine.hold.set()
            await w.server.stop(None)


async def test_a_worker_refusing_for_load_passes_the_request_to_the_next():
    # No hold: each request asks the workers.
    async with _two_busy_workers(overload_hold=0) as (pool, _, on_b, b_hold):
        # Both busy with no queue: refused by a, then by b, and the client gets the 429.
        with pytest.raises(OverloadedError):
            await pool.open_stream(_request("three"))
        b_hold.set()
        async for _ in on_b:
            pass
        # a still refuses; b has room again and takes it.
        assert await _text(pool, _request("four")) == "Hello!"


def _rejected(model: str, reason: str) -> float:
    return REGISTRY.get_sample_value("ark_admission_rejected_total", {"model": model, "reason": reason}) or 0.0


async def test_once_every_worker_refused_for_load_the_edge_refuses_itself_until_the_hold_passes():
    async with _two_busy_workers(overload_hold=0.5) as (pool, _, on_b, b_hold):
        asked = _rejected("fake", "queue_full")
        with pytest.raises(OverloadedError):
            await pool.open_stream(_request("three"))  # both workers asked, both refused
        assert _rejected("fake", "queue_full") == asked + 2
        # Within the hold: refused by the edge itself, with Retry-After, and no worker hears of it.
        held = _rejected("chat", "saturated_at_edge")
        for i in range(5):
            with pytest.raises(OverloadedError) as refused:
                await pool.open_stream(_request(f"burst {i}"))
            assert refused.value.retry_after >= 1
        assert _rejected("fake", "queue_full") == asked + 2
        assert _rejected("chat", "saturated_at_edge") == held + 5
        # b finishes; once the hold has passed, requests reach the workers again and b takes one.
        b_hold.set()
        async for _ in on_b:
            pass
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                assert await _text(pool, _request("four")) == "Hello!"
                break
            except OverloadedError:
                assert asyncio.get_running_loop().time() < deadline, "still refused long after the hold"
                await asyncio.sleep(0.1)


async def test_a_worker_stopping_gracefully_hands_its_queue_over_and_ends_its_streams_with_a_status(two_workers):
    """What serve() does on SIGTERM (services/common/shutdown.py), one step at a time."""
    a, b, pool = two_workers
    a.engine.hold.clear()
    running = await pool.open_stream(_request("long"))  # a
    assert await _text(pool, _request("short")) == "Hello!"  # b
    queued = asyncio.create_task(_text(pool, _request("waiting")))  # a, queued
    await asyncio.sleep(0.2)
    a.generator.admission.close()  # the queue is refused: nothing was started, so b takes it
    assert await asyncio.wait_for(queued, 10) == "Hello!"
    assert a.shutdown.end_all() == 1  # the grace is over: the running stream ends with a status
    with pytest.raises(UnavailableError) as info:
        async for _ in running:
            pass
    assert info.value.code == "server_shutting_down"
    # Not taken for a crash: the same request is not quarantined (b serves it: a refuses new work).
    assert await _text(pool, _request("long")) == "Hello!"
    assert len(a.engine.runs) == 1 and len(b.engine.runs) == 3


@pytest.mark.parametrize("says_working", [True, False])
async def test_a_worker_long_silent_on_a_started_request_is_not_taken_for_hung_while_it_says_it_is_working(
    says_working: bool,
):
    """A request that waits longer than the edge's silence deadline for its first token (a worker prefilling many
    long prompts) completes, and its worker stays routable, because the worker says it is working on it
    (GenerationWorking); a worker that says nothing for that long is taken for hung (the control)."""
    engine = FakeEngine()
    engine.hold = asyncio.Event()  # every token waits for it
    generator = Generator(engine, max_queue=4)
    service = chat_service({"fake": generator}, working_every=0.2 if says_working else 60)
    server, port, health = create_server([service], "127.0.0.1:0", shutdown=ShutdownGuard())
    await server.start()
    await mark_serving(health, [service.name])
    pool = ChatWorkers([f"127.0.0.1:{port}"], replace(POLICY, event_timeout=2.0))
    pool.start()
    try:
        reading = asyncio.create_task(_text(pool, _request("slow")))
        await asyncio.sleep(4.5)  # over two silence deadlines; `working` every 0.2 s
        engine.hold.set()
        if says_working:
            assert await reading == "Hello!"
            assert pool.soonest() == [f"127.0.0.1:{port}"]  # still routed to
        else:
            with pytest.raises(WorkerFailedError):
                await reading
    finally:
        engine.hold.set()
        await pool.close()
        await server.stop(None)
