"""The `settings` of an embeddings model in the configuration, one model per engine, checked when the configuration
loads (services/common/config.py, ENGINE_SETTINGS).

They live in the model's `settings` mapping (not in `ArkConfig`) because they belong to one model: a small CPU
model and a large GPU one want different batch bounds. This module imports no engine library.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from services.common.config import EngineSettings, ModelConfig, engine_settings


class EmbeddingsSettings(EngineSettings):
    """Batching, threading and output options every embeddings engine has (the embedder reads these)."""

    # A batch stays open while requests keep arriving: it closes after `batch_idle_ms` without a new one, and at the
    # latest `batch_window_ms` after it opened. A lone request waits only the idle gap.
    batch_window_ms: Annotated[float, Field(ge=0, le=100)] = 10.0
    batch_idle_ms: Annotated[float, Field(ge=0, le=100)] = 1.0
    # Inputs encoded in one forward pass.
    max_batch_size: Annotated[int, Field(ge=1)] = 64
    # Padded tokens (inputs x longest input) in one forward pass: bounds memory and per-batch latency.
    max_batch_tokens: Annotated[int, Field(ge=1)] = 16384
    # Inputs waiting for the encoder before new requests get 429: a bounded queue instead of unbounded latency.
    max_queued_inputs: Annotated[int, Field(ge=1)] = 8192
    # Batches encoded at the same time, each in its own thread (CPU engines; a GPU engine takes one at a time).
    encoder_threads: Annotated[int, Field(ge=1)] = 1
    # Whether `dimensions` may shorten vectors (Matryoshka-trained models only; MiniLM is not).
    supports_dimensions: bool = False
    # CPU scheduling priority of the service, as `nice` (0 keeps the priority it was started with; process-wide: the
    # service takes the largest of its models' values). Encoding yields the cores to the edge, Envoy and chat
    # workers, which answer in milliseconds, and keeps every cycle they leave (services/embeddings/priority.py).
    nice: Annotated[int, Field(ge=0, le=19)] = 10

    @property
    def batch_window_seconds(self) -> float:
        return self.batch_window_ms / 1000

    @property
    def batch_idle_seconds(self) -> float:
        return min(self.batch_idle_ms, self.batch_window_ms) / 1000


class SentenceTransformersSettings(EmbeddingsSettings):
    """`settings:` of a sentence_transformers embeddings model."""

    # Sequences per forward pass; a larger batch is sorted by length and cut into passes.
    forward_batch_size: Annotated[int, Field(ge=1)] = 16
    # Intra-op threads of torch for one batch; unset keeps torch's default (one per core).
    torch_threads: Annotated[int, Field(ge=1)] | None = None
    # Spin-loop iterations torch's idle OpenMP threads busy-wait for the next operation before sleeping
    # (GOMP_SPINCOUNT, read once when torch loads; process-wide). OpenMP's default keeps them spinning for
    # milliseconds after every batch, on the cores the service and the edge need to answer it and to receive the next
    # requests; a short spin still bridges the gaps between the operations of one forward pass. Unset: OpenMP's own.
    openmp_spin_count: Annotated[int, Field(ge=0)] | None = 10000


class TensorRTLLMEmbeddingsSettings(EmbeddingsSettings):
    """`settings:` of a tensorrt_llm embeddings model."""

    # The Hugging Face folder holding the tokenizer (the engine folder holds none).
    tokenizer_path: str = Field(min_length=1)


def max_inputs_in_service(model: ModelConfig) -> int:
    """The most inputs the service holds for an embeddings model at once: its queue and a batch in each encoder (the
    edge refuses beyond it without asking: edge/clients/embeddings.py)."""
    settings = engine_settings(model)
    assert isinstance(settings, EmbeddingsSettings)
    return settings.max_queued_inputs + settings.max_batch_size * settings.encoder_threads
