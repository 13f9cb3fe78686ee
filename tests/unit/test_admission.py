import asyncio

import pytest

from services.common.admission import Admission
from services.common.errors import OverloadedError


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
