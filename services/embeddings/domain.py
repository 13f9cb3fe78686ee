"""What the embeddings service computes, free of gRPC and of any engine library.

The servicer turns protos into these types and back; the embedder consumes and produces only these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# One input: a text, or token ids of the model's own tokenizer without its special tokens.
EmbeddingInput = str | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    request_id: str
    model: str
    inputs: tuple[EmbeddingInput, ...]
    # Requested output size; None means the model's own.
    dimensions: int | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    # float32, shape (len(inputs), dimensions), each row of unit norm, in input order.
    vectors: np.ndarray
    # Tokens the model read across all inputs, special tokens included.
    prompt_tokens: int
