"""The narrow interface every embeddings engine implements (sentence-transformers on CPU, TensorRT-LLM on GPU).

An engine only tokenizes and encodes. Validation, limits, batching across requests and `dimensions` live above it
(services/embeddings/embedder.py), once for every engine, so engines can be swapped by configuration and the
serving logic can be tested against a fake.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np


class EmbeddingsEngine(ABC):
    """Turns token sequences of one model into unit vectors."""

    model_id: str
    # Size of the vectors `encode` returns.
    dimensions: int
    # Longest sequence the model reads, special tokens included; longer inputs are refused, never cut silently.
    max_sequence_length: int
    # Valid token ids are 0 .. vocab_size - 1.
    vocab_size: int
    # Largest batch the engine accepts (a built TensorRT engine has one); None: only the configured bound applies.
    max_batch_size: int | None = None
    # Whether `encode` may run in several threads at once (`encoder_threads` > 1).
    thread_safe: bool = True

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """The model's own tokenization of each text, special tokens included and nothing truncated.

        Thread-safe: large requests are tokenized in a worker thread while the event loop serves others.
        """

    @abstractmethod
    def add_special_tokens(self, ids: Sequence[int]) -> list[int]:
        """Frame content token ids (a text's ids without special tokens) exactly as `tokenize` frames a text."""

    @abstractmethod
    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed sequences as returned by `tokenize` / `add_special_tokens`: float32 (len(batch), dimensions), each
        row of unit norm.

        Blocking; the batcher calls it from its worker threads, at most `encoder_threads` batches at once (one, for
        an engine that is not `thread_safe`).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""
