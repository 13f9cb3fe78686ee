"""The embeddings service's own Prometheus metrics (served on its metrics port only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import Histogram

EMBEDDINGS_BATCH_SIZE = Histogram(
    "ark_embeddings_batch_size",
    "Inputs per encoder forward pass (concurrent requests share passes)",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


def observe_batch_sizes(model: str, encode: Callable[[Sequence[Any]], Any]) -> Callable[[Sequence[Any]], Any]:
    """`encode`, recording the size of every batch it is given."""
    histogram = EMBEDDINGS_BATCH_SIZE.labels(model)

    def observed(batch: Sequence[Any]) -> Any:
        histogram.observe(len(batch))
        return encode(batch)

    return observed
