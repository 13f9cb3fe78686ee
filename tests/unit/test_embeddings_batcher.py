"""Dynamic batching across concurrent requests, against a fake encoder that records the batches it is given."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from services.common.errors import OverloadedError, UnavailableError
from services.embeddings.batcher import Batcher


class FakeEncoder:
    """Returns, for each sequence, the sequence itself; can be held mid-batch to simulate a busy model."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, ...]]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.fail_next = False
        self.delay = 0.0  # seconds each batch takes, on top of any hold
        self._lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def __call__(self, batch: list[Sequence[int]]) -> list[tuple[int, ...]]:
        with self._lock:
            self.batches.append([tuple(seq) for seq in batch])
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.started.set()
        self.release.wait(timeout=10)
        time.sleep(self.delay)
        with self._lock:
            self.in_flight -= 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("encoder failure")
        return [tuple(seq) for seq in batch]

    def hold(self) -> None:
        self.release.clear()
        self.started.clear()


def make(encoder: FakeEncoder, **overrides) -> Batcher:
    bounds = {"window_seconds": 0.02, "max_batch_size": 64, "max_batch_tokens": 100_000, "max_queued": 1000}
    return Batcher(encoder, **(bounds | overrides))


async def wait_until_encoding(encoder: FakeEncoder) -> None:
    await asyncio.to_thread(encoder.started.wait, 5)


async def test_concurrent_requests_within_the_window_share_one_batch():
    encoder = FakeEncoder()
    batcher = make(encoder)
    results = await asyncio.gather(*(batcher.submit([[i, i]]) for i in range(20)))
    assert results == [[(i, i)] for i in range(20)]
    assert len(encoder.batches) == 1 and len(encoder.batches[0]) == 20
    await batcher.close()


async def test_a_lone_request_is_encoded_alone_after_the_window():
    encoder = FakeEncoder()
    batcher = make(encoder, window_seconds=0.01)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await batcher.submit([[1, 2, 3]]) == [(1, 2, 3)]
    assert encoder.batches == [[(1, 2, 3)]]
    assert loop.time() - start < 1.0  # the window, not a wait for a full batch
    await batcher.close()


async def test_results_come_back_in_request_order_though_queued_shortest_first():
    encoder = FakeEncoder()
    batcher = make(encoder)
    sequences = [[1] * 5, [2], [3] * 3, [4] * 2]
    assert await batcher.submit(sequences) == [tuple(s) for s in sequences]
    assert [len(s) for s in encoder.batches[0]] == [1, 2, 3, 5]
    await batcher.close()


async def test_batch_size_is_bounded():
    encoder = FakeEncoder()
    batcher = make(encoder, max_batch_size=4)
    await asyncio.gather(*(batcher.submit([[i]]) for i in range(10)))
    assert [len(b) for b in encoder.batches] == [4, 4, 2]
    await batcher.close()


async def test_padded_tokens_per_batch_are_bounded_and_an_oversized_sequence_runs_alone():
    encoder = FakeEncoder()
    batcher = make(encoder, max_batch_tokens=20)
    sequences = [[1] * 5] * 6 + [[2] * 30]
    await batcher.submit(sequences)
    for batch in encoder.batches:
        assert len(batch) == 1 or len(batch) * max(map(len, batch)) <= 20
    assert [len(b) for b in encoder.batches] == [4, 2, 1]
    await batcher.close()


async def test_requests_arriving_while_the_encoder_is_busy_form_the_next_batch():
    encoder = FakeEncoder()
    batcher = make(encoder, window_seconds=0.001)
    encoder.hold()
    first = asyncio.create_task(batcher.submit([[0]]))
    await wait_until_encoding(encoder)
    later = [asyncio.create_task(batcher.submit([[i]])) for i in range(1, 9)]
    await asyncio.sleep(0.05)  # far past the window: they wait for the encoder, not for the window
    encoder.release.set()
    await asyncio.gather(first, *later)
    assert [len(b) for b in encoder.batches] == [1, 8]
    await batcher.close()


async def test_a_small_request_does_not_wait_behind_all_of_a_large_one():
    encoder = FakeEncoder()
    batcher = make(encoder, max_batch_size=8)
    encoder.hold()
    blocker = asyncio.create_task(batcher.submit([[0]]))
    await wait_until_encoding(encoder)
    large = asyncio.create_task(batcher.submit([[1]] * 40))
    await asyncio.sleep(0)
    small = asyncio.create_task(batcher.submit([[2]]))
    await asyncio.sleep(0.05)
    encoder.release.set()
    await asyncio.gather(blocker, large, small)
    batch_of_small = next(i for i, b in enumerate(encoder.batches) if (2,) in b)
    assert batch_of_small == 1  # the first batch after the blocker, not the sixth
    assert sum(len(b) for b in encoder.batches) == 42
    await batcher.close()


async def test_a_cancelled_request_is_not_encoded():
    encoder = FakeEncoder()
    batcher = make(encoder, window_seconds=0.001)
    encoder.hold()
    blocker = asyncio.create_task(batcher.submit([[0]]))
    await wait_until_encoding(encoder)
    abandoned = asyncio.create_task(batcher.submit([[7]] * 5))
    kept = asyncio.create_task(batcher.submit([[8]]))
    await asyncio.sleep(0.01)
    abandoned.cancel()
    encoder.release.set()
    assert await kept == [(8,)]
    await blocker
    assert all((7,) not in batch for batch in encoder.batches)
    assert batcher.queued == 0
    await batcher.close()


async def test_a_full_queue_refuses_new_requests():
    encoder = FakeEncoder()
    batcher = make(encoder, max_queued=4, window_seconds=0.001)
    encoder.hold()
    blocker = asyncio.create_task(batcher.submit([[0]]))
    await wait_until_encoding(encoder)
    waiting = asyncio.create_task(batcher.submit([[1]] * 3))
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError):
        await batcher.submit([[2]] * 2)
    encoder.release.set()
    await asyncio.gather(blocker, waiting)
    await batcher.close()


async def test_admitted_requests_hold_their_place_while_they_are_tokenized_so_a_flood_is_refused_on_arrival():
    encoder = FakeEncoder()
    batcher = make(encoder, max_queued=4, window_seconds=0.001)
    first = batcher.admit(3)  # the embedder tokenizes its 3 inputs now: nothing is queued yet
    with pytest.raises(OverloadedError) as refused:
        batcher.admit(2)  # refused before it is tokenized: 3 + 2 would overfill the queue
    assert refused.value.retry_after >= 1 and "3 inputs are already queued" in refused.value.message
    second = batcher.admit(1)
    assert await batcher.submit([[1], [2], [3]], first) == [(1,), (2,), (3,)]
    second.release()  # it failed while tokenizing (a bad input): its place is free again
    second.release()  # once only
    assert await batcher.submit([[4]] * 4) == [(4,)] * 4
    await batcher.close()


async def test_admitted_requests_still_being_tokenized_count_towards_the_expected_wait():
    encoder = FakeEncoder()
    batcher = make(encoder, max_wait_seconds=0.1, window_seconds=0.001)
    encoder.delay = 0.05  # 10 tokens in 50 ms or more: at least 5 ms per token
    assert await batcher.submit([[1] * 10]) == [(1,) * 10]
    encoder.delay = 0.0
    tokenizing = batcher.admit(3)  # nothing queued, but 3 inputs of about 10 tokens each are on their way
    assert batcher.expected_wait() >= 0.15
    with pytest.raises(OverloadedError) as refused:
        batcher.admit(1)
    assert "would wait" in refused.value.message
    tokenizing.release()  # it failed while tokenizing
    assert batcher.expected_wait() == 0.0
    await batcher.close()


async def test_a_request_that_would_wait_past_the_bound_is_refused_on_arrival():
    encoder = FakeEncoder()
    batcher = make(encoder, max_wait_seconds=0.1, window_seconds=0.001)
    encoder.delay = 0.05  # 10 tokens in 50 ms or more: at least 5 ms per token
    assert await batcher.submit([[1] * 10]) == [(1,) * 10]
    encoder.delay = 0.0
    encoder.hold()
    blocker = asyncio.create_task(batcher.submit([[0]]))
    await wait_until_encoding(encoder)
    batcher.admit(1).release()  # nothing queued yet: no wait expected
    queued = [asyncio.create_task(batcher.submit([[2] * 10] * 3))]
    await asyncio.sleep(0)
    assert batcher.expected_wait() >= 0.15  # 30 tokens ahead
    with pytest.raises(OverloadedError) as refused:
        batcher.admit(1)  # what the embedder asks before tokenizing
    assert refused.value.retry_after >= 1 and "would wait" in refused.value.message
    with pytest.raises(OverloadedError):
        await batcher.submit([[3]])
    encoder.release.set()
    await asyncio.gather(blocker, *queued)
    assert all((3,) not in batch for batch in encoder.batches)
    await batcher.close()


async def test_a_request_still_waiting_at_the_bound_is_refused_then_and_never_encoded():
    encoder = FakeEncoder()
    batcher = make(encoder, max_wait_seconds=0.2, window_seconds=0.001)
    encoder.hold()
    blocker = asyncio.create_task(batcher.submit([[0]]))
    await wait_until_encoding(encoder)
    with pytest.raises(OverloadedError) as refused:
        await batcher.submit([[4]])  # nothing measured yet, so admitted; then it waits out the bound
    assert "waited" in refused.value.message
    assert batcher.queued == 0
    encoder.release.set()
    await blocker
    assert all((4,) not in batch for batch in encoder.batches)
    await batcher.close()


async def test_a_request_whose_encoding_has_begun_is_not_refused_at_the_bound():
    encoder = FakeEncoder()
    batcher = make(encoder, max_wait_seconds=0.1, window_seconds=0.001, max_batch_size=1)
    encoder.hold()
    request = asyncio.create_task(batcher.submit([[5], [6]]))  # [5] reaches the encoder and is held there
    await wait_until_encoding(encoder)
    await asyncio.sleep(0.3)  # past the bound, with [6] still waiting
    assert not request.done()
    encoder.release.set()
    assert await request == [(5,), (6,)]
    await batcher.close()


async def test_an_encoder_failure_fails_that_batch_only():
    encoder = FakeEncoder()
    batcher = make(encoder)
    encoder.fail_next = True
    with pytest.raises(RuntimeError, match="encoder failure"):
        await batcher.submit([[1]])
    assert await batcher.submit([[2]]) == [(2,)]
    await batcher.close()


async def test_close_fails_what_is_still_queued_and_refuses_new_requests():
    encoder = FakeEncoder()
    batcher = make(encoder, window_seconds=0.001)
    encoder.hold()
    running = asyncio.create_task(batcher.submit([[0]]))
    await wait_until_encoding(encoder)
    queued = asyncio.create_task(batcher.submit([[1]]))
    await asyncio.sleep(0)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.01)
    encoder.release.set()
    await closing
    assert await running == [(0,)]  # the batch in the encoder still completes
    with pytest.raises(UnavailableError):
        await queued
    with pytest.raises(UnavailableError):
        await batcher.submit([[2]])


async def test_several_encoders_work_on_batches_side_by_side_and_the_next_one_waits_for_a_free_encoder():
    encoder = FakeEncoder()
    batcher = make(encoder, window_seconds=0.001, encoders=2)
    encoder.hold()
    first = asyncio.create_task(batcher.submit([[1]]))
    await wait_until_encoding(encoder)
    encoder.started.clear()
    second = asyncio.create_task(batcher.submit([[2]]))
    await wait_until_encoding(encoder)
    later = [asyncio.create_task(batcher.submit([[3]])) for _ in range(6)]
    await asyncio.sleep(0.05)
    assert len(encoder.batches) == 2  # both encoders busy: the six wait, together
    encoder.release.set()
    await asyncio.gather(first, second, *later)
    assert encoder.most_in_flight == 2
    assert [len(b) for b in encoder.batches] == [1, 1, 6]
    await batcher.close()


async def test_close_lets_every_encoder_finish_its_batch():
    encoder = FakeEncoder()
    batcher = make(encoder, window_seconds=0.001, encoders=2)
    encoder.hold()
    running = []
    for i in range(2):
        encoder.started.clear()
        running.append(asyncio.create_task(batcher.submit([[i]])))
        await wait_until_encoding(encoder)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.01)
    encoder.release.set()
    await closing
    assert encoder.most_in_flight == 2
    assert [await r for r in running] == [[(0,)], [(1,)]]


async def test_a_lone_request_waits_only_the_idle_gap_not_the_whole_window():
    encoder = FakeEncoder()
    batcher = make(encoder, window_seconds=5.0, idle_seconds=0.01)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await batcher.submit([[1]]) == [(1,)]
    assert loop.time() - start < 2.5  # far less than the 5 s window
    await batcher.close()


async def test_a_burst_with_short_gaps_stays_one_batch():
    encoder = FakeEncoder()
    batcher = make(encoder, window_seconds=5.0, idle_seconds=0.2)
    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(batcher.submit([[i]])))
        await asyncio.sleep(0.02)  # well inside the idle gap
    await asyncio.gather(*tasks)
    assert [len(b) for b in encoder.batches] == [5]
    await batcher.close()


async def test_a_steady_stream_is_cut_at_the_window():
    encoder = FakeEncoder()
    batcher = make(encoder, window_seconds=0.1, idle_seconds=1.0)
    tasks = []
    for i in range(30):
        tasks.append(asyncio.create_task(batcher.submit([[i]])))
        await asyncio.sleep(0.01)  # never idle for long, so only the window closes batches
    await asyncio.gather(*tasks)
    assert len(encoder.batches) >= 2 and sum(len(b) for b in encoder.batches) == 30
    await batcher.close()
