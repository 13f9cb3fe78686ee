"""A chat worker's own Prometheus metrics (served on its metrics port only): its load, read when scraped, and its
state tiers (host memory, local disk).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import REGISTRY, GaugeMetricFamily

TIER_HITS = Counter(
    "ark_chat_state_tier_hits",
    "Conversation states taken back from a tier (restored instead of recomputed)",
    ["model", "tier"],
)
TIER_EVICTIONS = Counter(
    "ark_chat_state_tier_evictions",
    "States pushed out of a tier for lack of room: from host they move down to disk, from disk they are deleted",
    ["model", "tier"],
)
TIER_BYTES = Gauge("ark_chat_state_tier_bytes", "Bytes of conversation state held in a tier", ["model", "tier"])
TIER_ENTRIES = Gauge("ark_chat_state_tier_entries", "Conversation states held in a tier", ["model", "tier"])
RESTORE_SECONDS = Histogram(
    "ark_chat_state_restore_seconds",
    "Time to bring a saved state back into a context (read from its tier and load), by the tier it came from",
    ["model", "tier"],
    # A few MB from memory takes milliseconds; a long history from disk tens of milliseconds to a second.
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

FORCED_TOKENS = Counter(
    "ark_chat_engine_forced_tokens",
    "Output tokens the output constraint forced, evaluated together with the step before instead of sampled one "
    "step each (jump-forward decoding: a tool call's head, a schema's fixed keys)",
    ["model"],
)
KV_CELLS = Gauge(
    "ark_chat_kv_cells",
    "The engine's KV cache (llama.cpp): cells in use, and cells every decoded row walks (up to the highest in use: "
    "free cells below it cost a row as much as used ones)",
    ["model", "part"],
)
KV_MOVES = Counter(
    "ark_chat_kv_moves",
    "Times an idle worker moved its sequences down to the start of its KV cache, the cells in use having spread far "
    "above free ones (llama.cpp)",
    ["model"],
)
ENGINE_CPU = Counter(
    "ark_chat_engine_cpu_seconds",
    "CPU time of the engine's decode loop (llama.cpp): inside llama_decode, and the rest of its steps (planning the "
    "batch, sampling, handing tokens over); what the rest takes is taken from decoding on a busy machine",
    ["model", "part"],
)


class _EngineStatus(Protocol):
    session_capacity: int
    resident_sessions: int
    queued_requests: int


class _Generator(Protocol):
    def status(self) -> _EngineStatus: ...


class _LoadCollector:
    """Queue depth and resident sessions per model, read from the generators at scrape time.

    Scrapes run on the metrics server's thread; `status()` only reads counters, which is safe from another thread.
    """

    def __init__(self, generators: Mapping[str, _Generator]) -> None:
        self._generators = generators

    def collect(self) -> Iterable[GaugeMetricFamily]:
        queued = GaugeMetricFamily(
            "ark_chat_queue_depth", "Requests waiting for a slot on this worker", labels=["model"]
        )
        resident = GaugeMetricFamily(
            "ark_chat_resident_sessions", "Sessions whose state is resident on this worker", labels=["model"]
        )
        capacity = GaugeMetricFamily(
            "ark_chat_session_capacity", "Sessions this worker can keep resident", labels=["model"]
        )
        for model, generator in self._generators.items():
            status = generator.status()
            queued.add_metric([model], status.queued_requests)
            resident.add_metric([model], status.resident_sessions)
            capacity.add_metric([model], status.session_capacity)
        return [queued, resident, capacity]


def register_generators(generators: Mapping[str, _Generator]) -> None:
    """Expose the generators' queue depth, resident sessions and capacity."""
    REGISTRY.register(_LoadCollector(generators))
