"""Prometheus metrics of the state tiers (host memory, local disk) of a chat worker.

Defined in the chat package, so only processes that keep conversation state (chat workers) expose them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
