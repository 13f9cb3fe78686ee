"""Child processes of the stack: start, wait for health, stop on signal, free every port."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass
class Child:
    """One process of the stack and how to tell that it is ready."""

    name: str
    argv: list[str]
    address: str  # host:port it listens on
    kind: str  # "grpc" or "http"
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's environment
    other_addresses: tuple[str, ...] = ()  # further ports it listens on (metrics, admin)
    health_url: str | None = None  # for "http": default http://<address>/health
    # Stopping goes stage by stage (lowest first); a child gets `stop_timeout` seconds before SIGKILL.
    stop_stage: int = 2
    stop_timeout: float = 15.0

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.address, *self.other_addresses)

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # Own process group: a Ctrl-C reaches the launcher only, which then stops children in order. Being in their
        # own session, children would outlive a launcher that is killed (a process manager's SIGKILL, an OOM kill)
        # and keep every port: the kernel kills them when the launcher dies instead (die_with_parent).
        self.process = subprocess.Popen(
            self.argv,
            env={**env, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),
        )
        log.close()

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def healthy(self) -> bool:
        if self.kind == "grpc":
            return grpc_serving(self.address)
        return http_ok(self.health_url or f"http://{self.address}/health")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int):
    """A `preexec_fn` that has the kernel SIGKILL the child when the process that started it dies, however it dies.

    SIGKILL rather than SIGTERM: with the launcher gone nothing orders the stop (edge first, then the services), a
    stopped (SIGSTOPped) child would never act on SIGTERM, and the next `ark up` needs the ports at once. The signal
    follows the death of the thread that forked, so children are started from the launcher's main thread only (the
    supervisor restarts from its loop there). Linux only; elsewhere children are stopped by `Stack.stop` alone.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the launcher died between fork and prctl: nobody would signal us
            os._exit(1)

    return preexec


def grpc_serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def reachable(host: str) -> str:
    """An address to connect to for a listener bound to `host` (a wildcard means: this machine)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def port_in_use(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return True
    return False


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# Of a bounded stop (`Stack.stop(timeout)`): what each later stage is sure to get (a drained edge leaves the
# services idle, and an idle service exits in well under a second).
STAGE_RESERVE_SECONDS = 3.0


class Stack:
    """Starts children in order, waits for each to be healthy, and stops them all (reverse order) on exit."""

    def __init__(self, children: list[Child], env: dict[str, str] | None = None) -> None:
        self.children = children
        self.env = {**os.environ, **(env or {})}

    def start(self, *, timeout: float = 600, progress=print) -> None:
        busy = [(c, a) for c in self.children for a in c.addresses if port_in_use(a)]
        if busy:
            names = ", ".join(f"{c.name} ({a})" for c, a in busy)
            raise RuntimeError(f"port already in use: {names}. Is another ARK running? (stop it, or change ports)")
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        # The services first, then the front (Envoy, the edge): an edge that starts before the workers serve would
        # mark them unreachable and answer its first requests with 503s until its probes see them.
        for stage in sorted({c.stop_stage for c in self.children}, reverse=True):
            group = [c for c in self.children if c.stop_stage == stage]
            for child in group:
                child.start(self.env)
            self._wait_healthy(group, deadline, started, progress)

    def _wait_healthy(self, children: list[Child], deadline: float, started: float, progress) -> None:
        pending = list(children)
        last_report = 0.0
        while pending:
            for child in list(pending):
                code = child.exited()
                if code is not None:
                    raise RuntimeError(f"{child.name} exited with code {code} while starting:\n{child.log_tail()}")
                if child.healthy():
                    pending.remove(child)
                    progress(f"  ready: {child.name} on {child.address} ({time.monotonic() - started:.1f} s)")
            if pending and time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                progress(f"  waiting for {', '.join(c.name for c in pending)} (loading models)…")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {', '.join(c.name for c in pending)}")
            time.sleep(0.1)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the children stage by stage, each stage waited for before the next, SIGKILL past a child's timeout.

        The edge goes first and drains: its streams still flow through Envoy and reach the workers, and new requests
        still reach it and get a 503 with Retry-After. Then Envoy, then the services, together. With `timeout`, the
        whole stop ends within it: a process manager SIGKILLs a launcher that overstays its stop (Kubernetes and
        many others after 30 s), and that would skip the order above; each stage keeps `STAGE_RESERVE_SECONDS` for
        every stage after it, and what is still running at its share's end is killed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        stages = sorted({c.stop_stage for c in self.children})
        for position, stage in enumerate(stages):
            group = [c for c in reversed(self.children) if c.stop_stage == stage and c.process is not None]
            for child in group:
                if child.exited() is None:
                    child.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            stage_end = None
            if deadline is not None:
                stage_end = deadline - STAGE_RESERVE_SECONDS * (len(stages) - 1 - position)
            for child in group:
                end = started + child.stop_timeout
                if stage_end is not None:
                    end = min(end, stage_end)
                try:
                    child.process.wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
