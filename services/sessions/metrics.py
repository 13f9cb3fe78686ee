"""The session registry's own Prometheus metrics (served on the registry's metrics port only)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

STORE_UP = Gauge("ark_session_store_up", "1 while the session store answers, 0 during an outage (stateless fallback)")
STORE_UP.set(1)
STORE_ERRORS = Counter(
    "ark_session_store_errors", "Store calls that failed; each failed placement is a request served statelessly"
)
PLACEMENTS = Counter(
    "ark_session_placements",
    "Conversation placements: `kept` on the worker holding the state, `placed` on a chosen worker (first turn, or the "
    "previous worker or its incarnation is gone)",
    ["outcome"],
)
SESSIONS_ENDED = Counter("ark_sessions_ended", "Sessions ended, by reason", ["reason"])
DROPS_DELIVERED = Counter(
    "ark_session_drops_delivered", "Drop notices a worker acknowledged at once (the rest go with its lease renewal)"
)
