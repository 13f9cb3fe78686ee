"""What the shared session store costs on the request path, and what scaling out the edges does to session hits.

Part 1, the store's added latency, side by side in one run: a session registry (`python -m services.sessions`) on
the in-memory store and one on a Redis-protocol server (redis-server on loopback), each asked to place the same
resumed conversations (`PlaceConversation`, the one registry call an edge makes per chat request) by a gRPC client
on loopback. Reported: p50/p90 of the call on each store, the difference (the store's added latency; goal <= 2 ms at
p50), and the store commands per placement, read from the server's own counters (goal: 1 round trip).

Part 2, session hits with 3 edges versus 1: the scaled topology (tests/support/scaled_stack.py: Envoy's round robin
over the edges, registries on one Redis store, two chat workers on the embedded model) with 3 edges and 2
registries, then with 1 edge and 1 registry. Several conversations run interleaved through the official client, each
keeping its cookie; a turn is a hit when it is served by the worker incarnation that served the conversation's
first turn (x-ark-worker) and reuses state (cached_tokens > 0). Goal: the same hit rate with 3 edges as with 1.

    .venv/bin/python -m bench.session_store
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import httpx
import openai
import redis as redis_py

from ark.sessions.v1 import session_registry_service_pb2 as pb
from ark.sessions.v1 import session_registry_service_pb2_grpc as pb_grpc
from tests.support.redis_server import RedisServer
from tests.support.scaled_stack import start_scaled_stack
from tests.support.stack import ROOT, free_port

CALLS = 2000
WARMUP = 200
CONVERSATIONS = 6
TURNS = 4


def _script_calls(port: int) -> int:
    """EVALSHA calls since the last CONFIG RESETSTAT: each is one round trip from a registry to the store."""
    stats = redis_py.Redis(port=port).info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))


def _registry(store: str, log: Path) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "ARK__SESSIONS__STORE": store}
    env.pop("ARK_METRICS_PORT", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.sessions", "--address", address],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    return process, address


def _place_latencies(address: str) -> list[float]:
    """PlaceConversation round trips for resumed conversations, in seconds."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SessionRegistryServiceStub(channel)
        for name in ("bench-w1", "bench-w2"):
            worker = pb.Worker(name=name, address=name, models=["m"], session_capacity=8, incarnation="one")
            stub.RenewWorkerLease(pb.RenewWorkerLeaseRequest(worker=worker, lease_seconds=600))
        sessions = {}
        for c in range(16):
            reply = stub.PlaceConversation(
                pb.PlaceConversationRequest(api_key_hash="k", model="m", conversation_key=f"c{c}")
            )
            sessions[c] = reply.session.id
        times = []
        for i in range(WARMUP + CALLS):
            c = i % 16
            request = pb.PlaceConversationRequest(
                api_key_hash="k", model="m", session_id=sessions[c], conversation_key=f"c{c}"
            )
            started = time.perf_counter()
            reply = stub.PlaceConversation(request)
            elapsed = time.perf_counter() - started
            assert not reply.session_created and not reply.placed
            if i >= WARMUP:
                times.append(elapsed)
    return times


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1]


def store_latency(tmp: Path) -> dict[str, float]:
    redis = RedisServer(tmp)
    redis.start()
    results = {}
    try:
        for name, store in (("memory", "memory"), ("redis", redis.url)):
            process, address = _registry(store, tmp / f"registry-{name}.log")
            try:
                if name == "redis":
                    _place_latencies(address)  # loads the scripts; then count a clean run
                    redis_py.Redis(port=redis.port).config_resetstat()
                times = _place_latencies(address)
                if name == "redis":
                    renewals = 2
                    placements = WARMUP + CALLS + 16
                    results["store_round_trips_per_placement"] = (_script_calls(redis.port) - renewals) / placements
            finally:
                process.terminate()
                process.wait(30)
            results[f"{name}_p50_ms"] = _quantile(times, 0.5) * 1000
            results[f"{name}_p90_ms"] = _quantile(times, 0.9) * 1000
    finally:
        redis.stop()
    results["added_p50_ms"] = results["redis_p50_ms"] - results["memory_p50_ms"]
    return results


def hit_rate(tmp: Path, *, edges: int, registries: int) -> dict[str, float]:
    tmp.mkdir(parents=True, exist_ok=True)
    stack = start_scaled_stack(tmp, edges=edges, registries=registries)
    try:
        clients = [
            openai.OpenAI(
                base_url=stack.base_url, api_key=stack.api_key, max_retries=0, http_client=httpx.Client(timeout=120)
            )
            for _ in range(CONVERSATIONS)
        ]
        histories = [
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"User {uuid.uuid4().hex[:6]} asks: name a colour."},
            ]
            for _ in range(CONVERSATIONS)
        ]
        first_worker: dict[int, str] = {}
        hits = later_turns = errors = 0
        for t in range(TURNS):
            for c, client in enumerate(clients):
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model="gpt-4o", messages=histories[c], temperature=0, max_tokens=4
                    )
                except openai.APIStatusError as exc:  # counted, never hidden: a failed turn is not a hit
                    errors += 1
                    later_turns += t > 0
                    print(f"  turn {t + 1} of conversation {c + 1}: HTTP {exc.status_code} {exc.message}")
                    continue
                completion = raw.parse()
                worker = raw.headers["x-ark-worker"]
                if t == 0:
                    first_worker[c] = worker
                else:
                    later_turns += 1
                    hits += worker == first_worker.get(c) and completion.usage.prompt_tokens_details.cached_tokens > 0
                histories[c] += [
                    {"role": "assistant", "content": completion.choices[0].message.content},
                    {"role": "user", "content": "And another one?"},
                ]
        return {"hits": hits, "turns": later_turns, "rate": hits / later_turns, "errors": errors}
    finally:
        stack.stop_all()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        latency = store_latency(Path(tmp))
        print("Part 1 - PlaceConversation through a registry on loopback (one call per chat request)")
        print(f"  {'store':<8} {'p50 ms':>8} {'p90 ms':>8}")
        for name in ("memory", "redis"):
            print(f"  {name:<8} {latency[f'{name}_p50_ms']:>8.3f} {latency[f'{name}_p90_ms']:>8.3f}")
        print(f"  added by the Redis store at p50: {latency['added_p50_ms']:.3f} ms (goal <= 2 ms)")
        trips = latency["store_round_trips_per_placement"]
        print(f"  store round trips per placement: {trips:.2f} (goal: 1; includes the sweeper's 2 per second)")
        print()
        one = hit_rate(Path(tmp) / "one", edges=1, registries=1)
        three = hit_rate(Path(tmp) / "three", edges=3, registries=2)
        print(f"Part 2 - session hits, {CONVERSATIONS} interleaved conversations x {TURNS} turns through Envoy")
        print(f"  {'topology':<26} {'hits':>10} {'rate':>6} {'errors':>7}")
        for name, r in (("1 edge, 1 registry", one), ("3 edges, 2 registries", three)):
            print(f"  {name:<26} {r['hits']:>4}/{r['turns']:<5} {r['rate']:>6.0%} {r['errors']:>7}")
        ratio = three["rate"] / one["rate"] if one["rate"] else float("nan")
        print(f"  3 edges / 1 edge: {ratio:.2f}x (goal: 1.00x)")


if __name__ == "__main__":
    main()
