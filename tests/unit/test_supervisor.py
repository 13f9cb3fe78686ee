"""`ark up`'s supervision: real child processes killed, restarted with backoff, given up on past the budget."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from services.launcher.processes import Child
from services.launcher.supervisor import RestartPolicy, Supervisor, format_status


class _AlwaysHealthy(Child):
    def healthy(self) -> bool:
        return self.exited() is None


def _child(tmp_path: Path, name: str, code: str) -> Child:
    return _AlwaysHealthy(name, [sys.executable, "-c", code], "127.0.0.1:1", "http", tmp_path / f"{name}.log")


def _tick_until(supervisor: Supervisor, condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        supervisor.tick()
        time.sleep(0.02)


def test_a_killed_service_is_restarted_logged_and_counted(tmp_path: Path):
    child = _child(tmp_path, "worker", "import time; time.sleep(60)")
    child.start(dict(os.environ))
    lines: list[str] = []
    policy = RestartPolicy(initial_backoff=0.05)
    supervisor = Supervisor([child], dict(os.environ), tmp_path, policy, say=lines.append)
    try:
        first_pid = child.process.pid
        os.kill(first_pid, signal.SIGKILL)
        _tick_until(supervisor, lambda: supervisor.restarts == 1 and child.exited() is None)
        _tick_until(supervisor, lambda: any("is back" in line for line in lines))
        assert child.process.pid != first_pid
        assert any("killed by signal 9; restarting in 0.1 s" in line for line in lines), lines
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["restarts_total"] == 1
        assert status["services"]["worker"] | {"log": None} == {
            "state": "running",
            "pid": child.process.pid,
            "address": "127.0.0.1:1",
            "restarts": 1,
            "last_exit_code": -9,
            "last_exit_time": status["services"]["worker"]["last_exit_time"],
            "log": None,
        }
        assert "worker" in format_status(tmp_path / "status.json")
    finally:
        supervisor.stopping()
        child.process.kill()
        child.process.wait()


def test_backoff_doubles_and_a_crash_loop_is_given_up(tmp_path: Path):
    child = _child(tmp_path, "crasher", "raise SystemExit(3)")
    child.start(dict(os.environ))
    lines: list[str] = []
    policy = RestartPolicy(initial_backoff=0.1, max_restarts=3, window=60)
    supervisor = Supervisor([child], dict(os.environ), tmp_path, policy, say=lines.append)
    _tick_until(supervisor, lambda: any("not restarting" in line for line in lines))
    assert supervisor.restarts == 3
    backoffs = [line.split("restarting in ")[1].split(" s ")[0] for line in lines if "restarting in" in line]
    assert backoffs == ["0.1", "0.2", "0.4"]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["services"]["crasher"]["state"] == "given_up"
    assert status["services"]["crasher"]["last_exit_code"] == 3
    # Left down for good: more ticks start nothing.
    for _ in range(5):
        supervisor.tick()
    assert supervisor.restarts == 3 and child.exited() == 3


def test_a_hung_service_is_killed_and_restarted(tmp_path: Path):
    child = _child(tmp_path, "hung", "import time; time.sleep(60)")
    child.start(dict(os.environ))
    lines: list[str] = []
    policy = RestartPolicy(initial_backoff=0.01, liveness_timeout=0.2, probe_interval=0.05)
    supervisor = Supervisor([child], dict(os.environ), tmp_path, policy, say=lines.append)
    first_pid = child.process.pid
    try:
        os.kill(first_pid, signal.SIGSTOP)
        stopped = _AlwaysHealthy.healthy
        _AlwaysHealthy.healthy = lambda self: self.process.pid != first_pid  # the stopped one fails its check
        try:
            _tick_until(supervisor, lambda: supervisor.restarts == 1)
        finally:
            _AlwaysHealthy.healthy = stopped
        assert any("failed its health check" in line for line in lines), lines
        assert child.process.pid != first_pid
    finally:
        supervisor.stopping()
        child.process.kill()
        child.process.wait()
