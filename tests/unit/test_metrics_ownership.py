"""Each process exposes its own metrics: an edge metric never appears on a worker's /metrics, nor a worker's on the
edge's. Each package defines its own (edge/metrics.py, services/chat/metrics.py, services/embeddings/metrics.py,
services/sessions/metrics.py, services/common/grpc_metrics.py); services/common/metrics.py holds only what several
processes share.

Each process's metrics are what its entry modules register when imported (prometheus_client's default registry is
what `/metrics` serves), read in a fresh interpreter per process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_NAMES = """
import importlib, json, sys
from prometheus_client import REGISTRY
for module in sys.argv[1:]:
    importlib.import_module(module)
print(json.dumps(sorted(family.name for family in REGISTRY.collect())))
"""

PROCESSES = {
    "edge": ["edge.__main__"],
    "chat": ["services.chat.__main__"],
    "embeddings": ["services.embeddings.__main__"],
    "transcription": ["services.transcription.__main__"],
    "sessions": ["services.sessions.__main__"],
}
WORKERS = [name for name in PROCESSES if name != "edge"]


def metric_names(*modules: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", _NAMES, *modules], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.fixture(scope="module")
def names() -> dict[str, set[str]]:
    return {process: metric_names(*modules) for process, modules in PROCESSES.items()}


@pytest.fixture(scope="module")
def shared() -> set[str]:
    return metric_names("services.common.metrics")


def test_the_edge_and_the_workers_share_only_the_common_metrics(names, shared):
    for worker in WORKERS:
        both = names["edge"] & names[worker]
        assert both <= shared, f"on the edge and on {worker}: {sorted(both - shared)}"


def test_each_process_exposes_its_own_metrics(names):
    edge_only = {
        "ark_http_requests",
        "ark_edge_draining",
        "ark_chat_worker_routable",
        "ark_session_stateless_fallbacks",
    }
    assert edge_only <= names["edge"]
    for worker in WORKERS:
        assert not edge_only & names[worker], worker
        assert "ark_grpc_requests_in_flight" in names[worker], worker
    assert "ark_grpc_requests_in_flight" not in names["edge"]
    assert "ark_chat_state_tier_bytes" in names["chat"]
    assert "ark_embeddings_batch_size" in names["embeddings"]
    assert "ark_session_store_up" in names["sessions"]
    for other in ("edge", "embeddings", "transcription", "sessions"):
        assert "ark_chat_state_tier_bytes" not in names[other], other
    for other in ("edge", "chat", "transcription", "sessions"):
        assert "ark_embeddings_batch_size" not in names[other], other
    for other in ("edge", "chat", "embeddings", "transcription"):
        assert "ark_session_store_up" not in names[other], other
