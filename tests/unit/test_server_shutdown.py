"""What a stopping server closes is passed to it (services/common/server.py `serve(admissions=...)`), not found in
a process-wide registry: on SIGTERM the queued work of the admissions it was given is refused, and nothing else."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

import pytest

from services.common.admission import Admission
from services.common.errors import UnavailableError
from services.common.server import serve


async def _queued(admission: Admission) -> None:
    async with admission.slot():
        pass


async def test_sigterm_refuses_the_queue_of_the_admissions_given_to_the_server_only():
    given = Admission(slots=1, max_queue=4, name="test-serve-given")
    other = Admission(slots=1, max_queue=4, name="test-serve-other")
    release = asyncio.Event()

    async def hold(admission: Admission) -> None:
        async with admission.slot():
            await release.wait()

    holders = [asyncio.create_task(hold(a)) for a in (given, other)]
    await asyncio.sleep(0)
    queued_given, queued_other = asyncio.create_task(_queued(given)), asyncio.create_task(_queued(other))
    previous = signal.getsignal(signal.SIGTERM)
    server = asyncio.create_task(serve([], "127.0.0.1:0", grace_seconds=1, metrics_port=0, admissions=[given]))
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + 30
        while signal.getsignal(signal.SIGTERM) is previous:  # serve() has not installed its handler yet
            assert loop.time() < deadline and not server.done()
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(UnavailableError) as info:
            await asyncio.wait_for(queued_given, 10)
        assert info.value.code == "server_shutting_down"
        await asyncio.wait_for(server, 30)
        assert not queued_other.done(), "an admission the server was not given stays open"
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGTERM, previous)
        gc.unfreeze()
        release.set()
        await asyncio.gather(*holders, queued_other, return_exceptions=True)
