"""Stream events from a blocking engine loop running in a worker thread into the event loop.

Engine libraries (llama.cpp, CTranslate2) block and are not thread-safe, so each engine runs its loop on its own
single thread. The loop posts events as they happen (no waiting on the consumer); the consumer sees them in
order, sees an exception raised in the thread, and closing or cancelling it sets the abort flag the loop checks —
then waits until the thread has really stopped, because the engine's state stays in use until then.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
Post = Callable[[T], None]


async def stream_from_thread(
    executor: Executor,
    work: Callable[[Post[T], threading.Event], None],
    *,
    is_last: Callable[[T], bool],
) -> AsyncIterator[T]:
    """Run `work(post, abort)` on `executor`; yield what it posts until an item satisfies `is_last`."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[T | BaseException] = asyncio.Queue()
    abort = threading.Event()

    def post(item: T | BaseException) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    def body() -> None:
        try:
            work(post, abort)
        except BaseException as exc:  # delivered to the consumer, which raises it in the event loop
            post(exc)

    job = loop.run_in_executor(executor, body)
    try:
        while True:
            item = await events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if is_last(item):
                return
    finally:
        abort.set()
        await asyncio.shield(job)
