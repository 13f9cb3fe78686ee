"""The Prometheus metrics several ARK processes share, and how a gRPC service serves its metrics.

Each package defines its own metrics, so that a process exposes only what it does: the edge's in edge/metrics.py,
a chat worker's in services/chat/metrics.py, the embeddings service's in services/embeddings/metrics.py, the
registry's in services/sessions/metrics.py, every gRPC server's in services/common/grpc_metrics.py. Here: the
admission metrics (chat and transcription admission, the embeddings batcher, the edge's own refusals for load).

The edge serves its metrics at `/metrics` on its own port; each gRPC service serves them at
`http://<host>:<port>/metrics` on its metrics port (`metrics_port` in the configuration, passed by the launcher as
`ARK_METRICS_PORT`; containers set that variable directly). Ratios (cached tokens, error rates) are left to PromQL
over the counters, except where a per-request distribution says more than the average (the cached-token ratio
histogram).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import Counter, Histogram, start_http_server

METRICS_PORT_ENV = "ARK_METRICS_PORT"

# Seconds: from a fast JSON reply to a multi-minute generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# -- admission to engine slots (chat workers, transcription) -------------------------------------------------------

QUEUE_WAIT = Histogram(
    "ark_queue_wait_seconds",
    "Time an admitted request waited for an engine slot",
    ["model"],
    buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
)
ADMISSION_REJECTED = Counter(
    "ark_admission_rejected",
    "Requests refused before queueing for an engine slot: queue_full, wait_too_long (the expected wait exceeds the "
    "bound), timed_out (waited past the bound), shutting_down",
    ["model", "reason"],
)

# -- serving the metrics of a gRPC service ------------------------------------------------------------------------


def port_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """The metrics port a process was given through `ARK_METRICS_PORT` (unset or empty: none)."""
    value = (os.environ if env is None else env).get(METRICS_PORT_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{METRICS_PORT_ENV}={value!r} is not a port number")
    return int(value)


class MetricsServer:
    """Prometheus' HTTP exposition on its own thread; `close()` frees the port."""

    def __init__(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host)
        self.port = port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
