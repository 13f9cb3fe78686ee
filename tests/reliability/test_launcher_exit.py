"""`ark up` and its services end together: a launcher killed by SIGKILL (a process manager past its stop timeout,
the OOM killer) takes every service with it, and a launcher stopped with SIGTERM is gone within its stop bound even
when a service ignores SIGTERM. Real processes: the whole stack, and a child that refuses to stop."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.launcher.processes import Child, Stack, port_in_use
from tests.support.stack import free_port, start_stack

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) no longer serves anything: it counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_every_service_dies_with_a_sigkilled_launcher(tmp_path: Path):
    running = start_stack(tmp_path / "logs")
    pids: list[int] = []

    def supervised() -> list[int]:  # the status file appears once the supervisor has taken over from start-up
        path = running.log_dir / "status.json"
        services = json.loads(path.read_text())["services"].values() if path.exists() else []
        return [s["pid"] for s in services if s["pid"]]

    try:
        # Registry, two chat workers, embeddings, transcription, edge, Envoy.
        assert _wait_until(lambda: len(supervised()) == 7, 30), supervised()
        pids = supervised()
        running.process.kill()
        running.process.wait()
        assert _wait_until(lambda: not any(_alive(p) for p in pids), 10), [p for p in pids if _alive(p)]
        busy = lambda: [a for a in running.addresses.values() if port_in_use(a)]  # noqa: E731
        assert _wait_until(lambda: not busy(), 10), busy()
    finally:
        if running.process.poll() is None:
            running.stop()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


class _ServesHttp(Child):
    def healthy(self) -> bool:
        return self.exited() is None and port_in_use(self.address)


def test_a_bounded_stop_kills_what_ignores_sigterm(tmp_path: Path):
    address = f"127.0.0.1:{free_port()}"
    stubborn = (
        "import signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"s = socket.socket(); s.bind(('127.0.0.1', {address.rpartition(':')[2]})); s.listen(); time.sleep(600)"
    )
    child = _ServesHttp("stubborn", [sys.executable, "-c", stubborn], address, "http", tmp_path / "s.log")
    child.stop_timeout = 600  # its own timeout would keep a process manager waiting ten minutes
    stack = Stack([child])
    stack.start(progress=lambda _: None)
    started = time.monotonic()
    stack.stop(timeout=2)
    elapsed = time.monotonic() - started
    assert child.exited() is not None
    assert elapsed < 30, f"stop took {elapsed:.1f} s with a bound of 2 s"
