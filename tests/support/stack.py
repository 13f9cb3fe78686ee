"""Start the real stack (`ark up`, separate processes on free loopback ports) for end-to-end tests.

The stack is started exactly as a user starts it, with configuration overridden by environment variables only,
and stopped with SIGTERM; stopping checks that every port it used is free again. Clients go through Envoy (the
base URL is Envoy's public listener); the edge, the metrics endpoints and Envoy's admin port are in `addresses`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.launcher.processes import port_in_use

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_serving(address: str) -> int | None:
    """The pid of the stack process started with `--address <address>` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--address" in argv and address.encode() in argv:
            return int(entry.name)
    return None


@dataclass
class RunningStack:
    base_url: str
    api_key: str
    other_api_key: str
    process: subprocess.Popen
    log_dir: Path
    addresses: dict[str, str]
    output: list[str] = field(default_factory=list)
    # The services' internal token, for tests that call a service's gRPC API directly (token_metadata()).
    internal_token: str = ""

    def kill(self, name: str) -> None:
        """SIGKILL one process of the stack (`chat-1`, `registry`, …), as a crash would."""
        pid = pid_serving(self.addresses[name])
        assert pid is not None, f"no process serves {name}"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while port_in_use(self.addresses[name]) and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    @property
    def edge_url(self) -> str:
        """The edge itself, behind Envoy (what in-cluster clients may use)."""
        return f"http://{self.addresses['edge']}"

    def metrics_url(self, name: str) -> str:
        """Prometheus endpoint of `edge` or of a service (`registry`, `chat-1`, `embeddings`, …)."""
        return f"{self.edge_url}/metrics" if name == "edge" else f"http://{self.addresses[f'{name}-metrics']}/metrics"

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the launcher, wait, and return its exit code; raises if a port stays bound."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        deadline = time.monotonic() + 5
        busy = [a for a in self.addresses.values() if port_in_use(a)]
        while busy and time.monotonic() < deadline:
            time.sleep(0.1)
            busy = [a for a in self.addresses.values() if port_in_use(a)]
        if busy:
            raise AssertionError(f"ports still bound after stop: {busy}")
        return code


def start_stack(
    log_dir: Path, *, chat_workers: int = 2, extra_env: dict[str, str] | None = None, timeout: float = 900
) -> RunningStack:
    """Run `python -m services.launcher up` with every port moved to a free one; wait until it is ready."""
    api_key, other_api_key = f"sk-test-{secrets.token_hex(8)}", f"sk-other-{secrets.token_hex(8)}"
    internal_token = secrets.token_urlsafe(32)
    chat = [f"chat-{i + 1}" for i in range(chat_workers)]
    services = ["registry", *chat, "embeddings", "transcription"]
    names = [*services, *(f"{s}-metrics" for s in services), "edge", "envoy", "envoy-admin"]
    ports: set[int] = set()
    while len(ports) < len(names):  # distinct, even if the OS hands a port out twice
        ports.add(free_port())
    addresses = {name: f"127.0.0.1:{port}" for name, port in zip(names, sorted(ports), strict=True)}

    def port(name: str) -> str:
        return addresses[name].rpartition(":")[2]

    env = {
        **os.environ,
        "ARK__AUTH__API_KEYS": f"[{api_key}, {other_api_key}]",
        "ARK__SERVICES__INTERNAL_TOKEN": internal_token,  # what the launcher would generate, known to the tests
        "ARK_PORT": port("envoy"),  # the public port
        "ARK__ENVOY__ADMIN_PORT": port("envoy-admin"),
        "ARK__EDGE__PORT": port("edge"),
        "ARK__SERVICES__CHAT__WORKERS": f"[{','.join(addresses[c] for c in chat)}]",
        "ARK__SERVICES__CHAT__METRICS_PORTS": f"[{','.join(port(f'{c}-metrics') for c in chat)}]",
        **{f"ARK__SERVICES__{s.upper()}__ADDRESS": addresses[s] for s in ("registry", "embeddings", "transcription")},
        **{
            f"ARK__SERVICES__{s.upper()}__METRICS_PORT": port(f"{s}-metrics")
            for s in ("registry", "embeddings", "transcription")
        },
        # Admission by time refuses what would wait longer than this: generous on a slow, shared test machine;
        # tests of admission by time set their own bound.
        "ARK__LIMITS__MAX_QUEUE_WAIT_SECONDS": "120",
        **(extra_env or {}),
    }
    env.pop("ARK_API_KEY", None)  # the keys above, whatever the developer's shell says
    process = subprocess.Popen(
        [sys.executable, "-m", "services.launcher", "up", "--log-dir", str(log_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    ready = threading.Event()
    base_url: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if line.startswith("ARK_BASE_URL="):
                base_url.append(line.strip().partition("=")[2])
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not base_url:
        process.kill()
        raise RuntimeError("the stack did not start:\n" + "".join(output[-40:]))
    token = env["ARK__SERVICES__INTERNAL_TOKEN"]
    return RunningStack(base_url[0], api_key, other_api_key, process, log_dir, addresses, output, token)
