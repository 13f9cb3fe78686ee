import asyncio

import pytest

from services.common.admission import Admission
from services.common.errors import OverloadedError, UnavailableError


async def test_slots_are_granted_in_arrival_order():
    admission = Admission(slots=1, max_queue=10)
    order: list[int] = []
    gate = asyncio.Event()

    async def job(i: int) -> None:
        async with admission.slot():
            order.append(i)
            await gate.wait()

    tasks = [asyncio.create_task(job(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert order == [0] and admission.queued == 4
    gate.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_full_queue_is_refused_at_once():
    admission = Admission(slots=1, max_queue=1)
    hold = asyncio.Event()

    async def job() -> None:
        async with admission.slot():
            await hold.wait()

    running = asyncio.create_task(job())
    waiting = asyncio.create_task(job())
    await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError) as info:
        async with admission.slot():
            pass
    assert info.value.http_status == 429 and info.value.retry_after
    hold.set()
    await asyncio.gather(running, waiting)


async def test_cancelled_waiter_gives_up_its_place():
    admission = Admission(slots=1, max_queue=4)
    hold = asyncio.Event()

    async def job() -> None:
        async with admission.slot():
            await hold.wait()

    running = asyncio.create_task(job())
    waiting = asyncio.create_task(job())
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.sleep(0.01)
    assert admission.queued == 0
    hold.set()
    await running
    async with admission.slot():  # the slot came back
        assert admission.busy


async def _hold(admission: Admission, seconds: float) -> None:
    async with admission.slot():
        await asyncio.sleep(seconds)


async def test_a_request_that_would_wait_too_long_is_refused_at_once():
    admission = Admission(slots=1, max_queue=100, max_wait_seconds=0.25, name="test-wait")
    await _hold(admission, 0.1)  # one request measured: 0.1 s per slot
    running = asyncio.create_task(_hold(admission, 0.1))
    queued = [asyncio.create_task(_hold(admission, 0.1)) for _ in range(2)]
    await asyncio.sleep(0)
    assert admission.queued == 2
    # Three ahead of it (one running, two queued) at 0.1 s each: 0.3 s expected, above the 0.25 s bound.
    assert admission.expected_wait() == pytest.approx(0.3, rel=0.5)
    with pytest.raises(OverloadedError) as info:
        async with admission.slot():
            pass
    assert "would wait" in info.value.message  # refused on arrival, not after waiting
    assert info.value.http_status == 429 and info.value.retry_after >= 1
    assert admission.queued == 2
    await asyncio.gather(running, *queued)


async def test_a_short_queue_of_short_requests_is_admitted():
    admission = Admission(slots=1, max_queue=100, max_wait_seconds=1.0, name="test-short")
    await _hold(admission, 0.01)
    jobs = [asyncio.create_task(_hold(admission, 0.01)) for _ in range(10)]
    await asyncio.gather(*jobs)  # ten ahead at 0.01 s: well under the bound, none refused


async def test_nobody_waits_past_the_bound_even_when_the_estimate_was_wrong():
    admission = Admission(slots=1, max_queue=100, max_wait_seconds=0.2, name="test-timeout")
    await _hold(admission, 0.001)  # the estimate says requests are quick
    slow = asyncio.create_task(_hold(admission, 5))  # ...but this one is not
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError) as info:
        async with admission.slot():
            pass
    assert "waited 0.2 s" in info.value.message  # refused at the bound, long before the slot came free
    assert not slow.done()
    assert admission.queued == 0
    slow.cancel()


async def test_closing_refuses_the_queue_and_new_requests_but_not_the_running_one():
    admission = Admission(slots=1, max_queue=10, name="test-close")
    hold = asyncio.Event()
    results: list[str] = []

    async def job() -> None:
        try:
            async with admission.slot():
                await hold.wait()
                results.append("ran")
        except UnavailableError as exc:
            results.append(exc.code)

    running = asyncio.create_task(job())
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(job()) for _ in range(3)]
    await asyncio.sleep(0)
    admission.close()
    await asyncio.gather(*waiting)
    assert results == ["server_shutting_down"] * 3
    with pytest.raises(UnavailableError):
        async with admission.slot():
            pass
    hold.set()
    await running
    assert results[-1] == "ran"
    async with admission.slot(priority=True):  # housekeeping still runs
        pass
