"""Serving logic of one embeddings model, the same for every engine: validate, tokenize, batch, shape the output.

Inputs are tokenized once, by the model's own tokenizer; token-id inputs get the same special tokens a text gets,
so both take the same path to the encoder and `prompt_tokens` counts exactly what the model read. Nothing is
truncated: an input longer than the model's maximum sequence length is refused with the limit in the message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from services.common.config import ConfigError, LimitsConfig
from services.common.errors import InvalidRequestError, UnsupportedParameterError
from services.embeddings.batcher import Batcher
from services.embeddings.domain import EmbeddingInput, EmbeddingRequest, EmbeddingResult
from services.embeddings.engines.base import EmbeddingsEngine
from services.embeddings.metrics import observe_batch_sizes
from services.embeddings.settings import EmbeddingsSettings

# Above this many characters a request is tokenized in a worker thread, so that a large request does not hold the
# event loop (and with it everyone else's batching); below it the thread hop would cost more than it saves.
_INLINE_TOKENIZE_CHARS = 8192


class Embedder:
    def __init__(self, engine: EmbeddingsEngine, settings: EmbeddingsSettings, limits: LimitsConfig) -> None:
        self.engine = engine
        self._settings = settings
        self._limits = limits
        if settings.encoder_threads > 1 and not engine.thread_safe:
            raise ConfigError(
                f"models[{engine.model_id}].settings.encoder_threads: this engine encodes one batch at a time"
            )
        self._batcher = Batcher(
            observe_batch_sizes(engine.model_id, engine.encode),
            window_seconds=settings.batch_window_seconds,
            idle_seconds=settings.batch_idle_seconds,
            max_batch_size=min(settings.max_batch_size, engine.max_batch_size or settings.max_batch_size),
            max_batch_tokens=settings.max_batch_tokens,
            max_queued=settings.max_queued_inputs,
            encoders=settings.encoder_threads,
            max_wait_seconds=limits.max_queue_wait_seconds,
            name=f"encode-{engine.model_id}",
            model=engine.model_id,
        )

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """Unit vectors for every input, in order; raises InvalidRequestError naming the offending input."""
        if not request.inputs:
            raise InvalidRequestError("'input' must not be empty.", param="input", code="empty_array")
        if len(request.inputs) > self._limits.max_embedding_inputs:
            raise InvalidRequestError(
                f"'input' has {len(request.inputs)} items; at most {self._limits.max_embedding_inputs} are allowed.",
                param="input",
                code="array_above_max_length",
            )
        dimensions = self._output_dimensions(request.dimensions)
        # A request that would wait too long or overfill the queue is refused before it is tokenized.
        reservation = self._batcher.admit(len(request.inputs))
        try:
            sequences = await self._tokenize(request.inputs)
            prompt_tokens = sum(len(seq) for seq in sequences)
            if prompt_tokens > self._limits.max_embedding_tokens:
                raise InvalidRequestError(
                    f"Requested {prompt_tokens} tokens, max {self._limits.max_embedding_tokens} tokens per request.",
                    param="input",
                    code="max_tokens_per_request",
                )
            vectors = np.stack(await self._batcher.submit(sequences, reservation))
        finally:
            reservation.release()
        if dimensions != self.engine.dimensions:
            # Matryoshka shortening, as OpenAI's text-embedding-3: keep the leading components, back to unit norm.
            vectors = vectors[:, :dimensions]
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return EmbeddingResult(vectors.astype(np.float32, copy=False), prompt_tokens)

    async def close(self) -> None:
        await self._batcher.close()
        self.engine.close()

    def _output_dimensions(self, requested: int | None) -> int:
        native = self.engine.dimensions
        # Asking for the model's own size asks for nothing, so it is accepted from any model.
        if requested is None or requested == native:
            return native
        if not self._settings.supports_dimensions:
            raise UnsupportedParameterError(
                f"The model `{self.engine.model_id}` does not support 'dimensions': its vectors always have "
                f"{native} dimensions.",
                param="dimensions",
            )
        if not 1 <= requested <= native:
            raise InvalidRequestError(
                f"Invalid value for 'dimensions': {requested}; the model `{self.engine.model_id}` supports 1 to "
                f"{native}.",
                param="dimensions",
                code="invalid_value",
            )
        return requested

    async def _tokenize(self, inputs: Sequence[EmbeddingInput]) -> list[list[int]]:
        many = len(inputs) > 1
        texts = [(i, text) for i, text in enumerate(inputs) if isinstance(text, str)]
        for i, text in texts:
            if not text:
                raise InvalidRequestError(
                    "'input' must not contain empty strings.", param=_param(i, many), code="empty_string"
                )
        sequences: list[list[int]] = [[] for _ in inputs]
        for i, ids in enumerate(inputs):
            if not isinstance(ids, str):
                self._check_ids(i, many, ids)
                sequences[i] = self.engine.add_special_tokens(ids)
        if texts:
            strings = [text for _, text in texts]
            if sum(map(len, strings)) > _INLINE_TOKENIZE_CHARS:
                tokenized = await asyncio.to_thread(self.engine.tokenize, strings)
            else:
                tokenized = self.engine.tokenize(strings)
            for (i, _), seq in zip(texts, tokenized, strict=True):
                sequences[i] = seq
        limit = self.engine.max_sequence_length
        for i, seq in enumerate(sequences):
            if len(seq) > limit:
                raise InvalidRequestError(
                    f"This model's maximum context length is {limit} tokens (its special tokens included), "
                    f"however {_param(i, many)} has {len(seq)} tokens. Please reduce the input's length.",
                    param=_param(i, many),
                    code="context_length_exceeded",
                )
        return sequences

    def _check_ids(self, i: int, many: bool, ids: Sequence[int]) -> None:
        if not ids:
            raise InvalidRequestError(
                "'input' must not contain empty token arrays.", param=_param(i, many), code="empty_array"
            )
        vocab = self.engine.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise InvalidRequestError(
                f"Invalid token id {bad} in {_param(i, many)}: the model's vocabulary has ids 0 to {vocab - 1}.",
                param=_param(i, many),
                code="invalid_value",
            )


def _param(i: int, many: bool) -> str:
    return f"input[{i}]" if many else "input"
