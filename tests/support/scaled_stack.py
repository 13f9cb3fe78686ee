"""The scaled topology as separate processes: a Redis-protocol store, chat workers, several session registries on
that store, several edges, and Envoy balancing the edges round robin (what deploy/compose.yaml and the Kubernetes
manifests run). Each process can be killed, stopped and started again on the same address, as an orchestrator would.

Edges and workers reach the registries through one gRPC target naming all of them (`ipv4:a:p,b:p`), balanced round
robin with retries on another registry when one is gone (edge/clients/registry.py).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import yaml

from ark.sessions.v1 import session_registry_service_pb2 as reg_pb
from ark.sessions.v1 import session_registry_service_pb2_grpc as reg_grpc
from services.common.config import load_config
from services.launcher import envoy_config
from services.launcher.envoy_runner import envoy_command
from services.launcher.processes import port_in_use
from tests.support.redis_server import RedisServer
from tests.support.stack import ROOT, free_port


@dataclass
class Process:
    name: str
    argv: list[str]
    address: str
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        deadline = time.monotonic() + 10
        while port_in_use(self.address) and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.stop(signal.SIGKILL)


@dataclass
class ScaledStack:
    api_key: str
    store: RedisServer
    log_dir: Path
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.processes['envoy'].address}/v1"

    def names(self, prefix: str) -> list[str]:
        return [n for n in self.processes if n.startswith(prefix)]

    def start(self, name: str) -> None:
        self.processes[name].start()

    def live_workers(self) -> list[reg_pb.Worker]:
        """The workers with a live lease, as a registry that is up sees them ([] when none answers)."""
        for name in self.names("registry-"):
            try:
                with grpc.insecure_channel(self.processes[name].address) as channel:
                    stub = reg_grpc.SessionRegistryServiceStub(channel)
                    return list(stub.ListWorkers(reg_pb.ListWorkersRequest(), timeout=2).workers)
            except grpc.RpcError:
                continue
        return []

    def wait_until(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; logs in {self.log_dir}")
            time.sleep(0.1)

    def wait_ready(self, timeout: float = 300) -> None:
        """Every process listening, the workers registered, every edge routing to every worker (its health probes
        have seen them serve), and Envoy routing to the edges."""
        for process in self.processes.values():
            self.wait_until(lambda p=process: port_in_use(p.address), f"{process.name} to listen", timeout)
        workers = len(self.names("chat-"))
        self.wait_until(lambda: len(self.live_workers()) == workers, "the workers to register", timeout)
        for edge in self.names("edge-"):
            self.wait_until(lambda e=edge: self._routes_to_every_worker(e), f"{edge} to route to the workers", timeout)
        self.wait_until(self._edges_ready, "Envoy to route to the edges", timeout)

    def _routes_to_every_worker(self, edge: str) -> bool:
        try:
            text = httpx.get(f"http://{self.processes[edge].address}/metrics", timeout=2).text
        except httpx.HTTPError:
            return False
        return all(
            f'ark_chat_worker_routable{{worker="{self.processes[w].address}"}} 1.0' in text for w in self.names("chat-")
        )

    def _edges_ready(self) -> bool:
        try:
            return httpx.get(self.base_url.removesuffix("/v1") + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        self.store.stop()


def start_scaled_stack(
    log_dir: Path, *, chat_workers: int = 2, registries: int = 2, edges: int = 3, lease_seconds: float = 3.0
) -> ScaledStack:
    store = RedisServer(log_dir)
    store.start()
    api_key = f"sk-test-{secrets.token_hex(8)}"
    address = {}
    names = [
        *(f"chat-{i + 1}" for i in range(chat_workers)),
        *(f"registry-{i + 1}" for i in range(registries)),
        *(f"edge-{i + 1}" for i in range(edges)),
        "envoy",
        "envoy-admin",
        "unused",
    ]
    ports: set[int] = set()
    while len(ports) < len(names):
        ports.add(free_port())
    address = {n: f"127.0.0.1:{p}" for n, p in zip(names, sorted(ports), strict=True)}
    registry_target = "ipv4:" + ",".join(address[f"registry-{i + 1}"] for i in range(registries))
    env = {
        **os.environ,
        "ARK__AUTH__API_KEYS": f"[{api_key}]",
        "ARK__SESSIONS__STORE": store.url,
        "ARK__SESSIONS__WORKER_LEASE_SECONDS": str(lease_seconds),
        "ARK__SERVICES__REGISTRY__ADDRESS": registry_target,
        "ARK__SERVICES__CHAT__WORKERS": f"[{','.join(address[f'chat-{i + 1}'] for i in range(chat_workers))}]",
        # Health probes of the workers may wait behind a prefill on this shared 2-core machine; what is tested here
        # is placement, not the edge's failure detection (a killed worker still fails its calls at once).
        "ARK__EDGE__WORKER_PROBE_TIMEOUT_SECONDS": "10",
        "ARK__EDGE__WORKER_HANG_SECONDS": "60",
        # Not started: this stack serves chat only.
        "ARK__SERVICES__EMBEDDINGS__ADDRESS": address["unused"],
        "ARK__SERVICES__TRANSCRIPTION__ADDRESS": address["unused"],
    }
    for key in [k for k in env if k.endswith("METRICS_PORT") or k == "ARK_API_KEY"]:
        env.pop(key)
    stack = ScaledStack(api_key, store, log_dir)
    python = sys.executable

    def add(name: str, argv: list[str], extra: dict[str, str] | None = None) -> None:
        stack.processes[name] = Process(name, argv, address[name], log_dir / f"{name}.log", {**env, **(extra or {})})

    for i in range(chat_workers):
        add(f"chat-{i + 1}", [python, "-m", "services.chat", "--address", address[f"chat-{i + 1}"]])
    for i in range(registries):
        add(f"registry-{i + 1}", [python, "-m", "services.sessions", "--address", address[f"registry-{i + 1}"]])
    for i in range(edges):
        port = address[f"edge-{i + 1}"].rpartition(":")[2]
        add(f"edge-{i + 1}", [python, "-m", "edge"], {"ARK__EDGE__PORT": port})
    envoy_yaml = log_dir / "envoy.yaml"
    envoy_yaml.write_text(_envoy_over_edges(env, address, edges))
    add("envoy", envoy_command(envoy_yaml))
    for process in stack.processes.values():
        process.start()
    try:
        stack.wait_ready()
    except BaseException:
        stack.stop_all()
        raise
    return stack


def _envoy_over_edges(env: dict[str, str], address: dict[str, str], edges: int) -> str:
    """ARK's own Envoy configuration, with the edge cluster listing every edge (round robin, health-checked)."""
    config = load_config(
        env={
            **env,
            "ARK__ENVOY__PORT": address["envoy"].rpartition(":")[2],
            "ARK__ENVOY__ADMIN_PORT": address["envoy-admin"].rpartition(":")[2],
            "ARK__ENVOY__EDGE_ADDRESS": address["edge-1"],
            "ARK__ENVOY__HEALTH_CHECK_INTERVAL_SECONDS": "1",
        }
    )
    document = yaml.safe_load(envoy_config.render(config))
    [cluster] = [c for c in document["staticResources"]["clusters"] if c["name"] == envoy_config.EDGE_CLUSTER]
    [group] = cluster["loadAssignment"]["endpoints"]
    template = group["lbEndpoints"][0]
    group["lbEndpoints"] = []
    for i in range(edges):
        host, _, port = address[f"edge-{i + 1}"].rpartition(":")
        endpoint = yaml.safe_load(yaml.safe_dump(template))
        endpoint["endpoint"]["address"]["socketAddress"] |= {"address": host, "portValue": int(port)}
        group["lbEndpoints"].append(endpoint)
    return yaml.safe_dump(document, sort_keys=False)
