"""Child processes of the stack: start, wait for health, stop on signal, free every port."""

from __future__ import annotations

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

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # Own process group: a Ctrl-C reaches the launcher only, which then stops children in order.
        self.process = subprocess.Popen(
            self.argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def healthy(self) -> bool:
        return _grpc_serving(self.address) if self.kind == "grpc" else _http_ok(f"http://{self.address}/health")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _grpc_serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


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


class Stack:
    """Starts children in order, waits for each to be healthy, and stops them all (reverse order) on exit."""

    def __init__(self, children: list[Child], env: dict[str, str] | None = None) -> None:
        self.children = children
        self.env = {**os.environ, **(env or {})}

    def start(self, *, timeout: float = 600, progress=print) -> None:
        busy = [c for c in self.children if port_in_use(c.address)]
        if busy:
            names = ", ".join(f"{c.name} ({c.address})" for c in busy)
            raise RuntimeError(f"port already in use: {names}. Is another ARK running? (stop it, or change ports)")
        for child in self.children:
            child.start(self.env)
        deadline = time.monotonic() + timeout
        pending = list(self.children)
        last_report = 0.0
        started = time.monotonic()
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

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every child (edge first, so it stops taking requests), then SIGKILL stragglers."""
        for child in reversed(self.children):
            if child.exited() is None and child.process is not None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
