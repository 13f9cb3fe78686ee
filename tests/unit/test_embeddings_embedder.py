"""The embedder's rules, the same for every engine: validation, limits, token accounting, `dimensions`.

The engine is a fake (below the engine line); the real model is exercised by the integration and e2e tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from services.common.config import ConfigError, LimitsConfig, ModelConfig
from services.common.errors import InvalidRequestError, UnsupportedParameterError
from services.embeddings.domain import EmbeddingRequest
from services.embeddings.embedder import Embedder
from services.embeddings.engines.base import EmbeddingsEngine
from services.embeddings.settings import EmbeddingsSettings, SentenceTransformersSettings

CLS, SEP = 1, 2


class FakeEngine(EmbeddingsEngine):
    """Characters are tokens; a vector is a deterministic function of the sequence."""

    model_id = "fake"
    dimensions = 8
    max_sequence_length = 10
    vocab_size = 100

    def __init__(self) -> None:
        self.encoded: list[list[int]] = []

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.add_special_tokens([ord(c) % 90 + 10 for c in text]) for text in texts]

    def add_special_tokens(self, ids: Sequence[int]) -> list[int]:
        return [CLS, *ids, SEP]

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.encoded.extend(list(seq) for seq in batch)
        rows = np.array([[sum(seq) % (k + 3) + 1 for k in range(self.dimensions)] for seq in batch], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def embedder(limits: LimitsConfig | None = None, **settings) -> tuple[Embedder, FakeEngine]:
    engine = FakeEngine()
    return Embedder(engine, EmbeddingsSettings(batch_window_ms=0, **settings), limits or LimitsConfig()), engine


def request(*inputs, dimensions: int | None = None) -> EmbeddingRequest:
    return EmbeddingRequest("r", "fake", tuple(inputs), dimensions)


async def test_texts_are_embedded_in_order_with_exact_token_counts():
    emb, _ = embedder()
    result = await emb.embed(request("abc", "hello", "x"))
    assert result.vectors.shape == (3, 8) and result.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1)
    assert result.prompt_tokens == (3 + 2) + (5 + 2) + (1 + 2)
    await emb.close()


async def test_token_ids_take_the_same_path_as_the_text_they_encode():
    emb, engine = embedder()
    ids = tuple(engine.tokenize(["abc"])[0][1:-1])
    text, tokens = await emb.embed(request("abc")), await emb.embed(request(ids))
    assert np.array_equal(text.vectors, tokens.vectors)
    assert text.prompt_tokens == tokens.prompt_tokens
    assert engine.encoded[0] == engine.encoded[1] == [CLS, *ids, SEP]
    await emb.close()


@pytest.mark.parametrize(
    ("inputs", "param", "code"),
    [
        ((), "input", "empty_array"),
        (("",), "input", "empty_string"),
        (("ok", ""), "input[1]", "empty_string"),
        (((),), "input", "empty_array"),
        (((5, 100),), "input", "invalid_value"),
        (("ok", (5, -1)), "input[1]", "invalid_value"),
        (("123456789",), "input", "context_length_exceeded"),
        (("ok", tuple(range(10, 19))), "input[1]", "context_length_exceeded"),
    ],
)
async def test_bad_inputs_are_refused_naming_the_input(inputs, param, code):
    emb, engine = embedder()
    with pytest.raises(InvalidRequestError) as info:
        await emb.embed(request(*inputs))
    assert (info.value.param, info.value.code, info.value.http_status) == (param, code, 400)
    assert engine.encoded == []
    await emb.close()


async def test_the_length_limit_is_in_the_message_and_the_longest_allowed_input_passes():
    emb, _ = embedder()
    with pytest.raises(InvalidRequestError, match="maximum context length is 10 tokens"):
        await emb.embed(request("x" * 9))
    assert (await emb.embed(request("x" * 8))).prompt_tokens == 10
    await emb.close()


async def test_configured_limits_on_inputs_and_total_tokens():
    emb, _ = embedder(LimitsConfig(max_embedding_inputs=3, max_embedding_tokens=12))
    with pytest.raises(InvalidRequestError) as too_many:
        await emb.embed(request("a", "b", "c", "d"))
    assert too_many.value.code == "array_above_max_length" and too_many.value.param == "input"
    assert (await emb.embed(request("abcd", "abcd"))).prompt_tokens == 12  # at the limit: fine
    with pytest.raises(InvalidRequestError) as too_long:
        await emb.embed(request("abcd", "abcde"))
    assert too_long.value.code == "max_tokens_per_request" and "max 12 tokens" in too_long.value.message
    await emb.close()


async def test_dimensions_are_refused_for_a_model_that_does_not_support_them():
    emb, _ = embedder()
    with pytest.raises(UnsupportedParameterError) as info:
        await emb.embed(request("abc", dimensions=4))
    assert (info.value.param, info.value.code) == ("dimensions", "unsupported_parameter")
    assert (await emb.embed(request("abc", dimensions=8))).vectors.shape == (1, 8)  # its own size asks for nothing
    await emb.close()


async def test_dimensions_shorten_and_renormalise_where_supported():
    emb, _ = embedder(supports_dimensions=True)
    full = (await emb.embed(request("abc"))).vectors[0]
    short = (await emb.embed(request("abc", dimensions=3))).vectors[0]
    assert short.shape == (3,) and np.isclose(np.linalg.norm(short), 1)
    assert np.allclose(short, full[:3] / np.linalg.norm(full[:3]))
    with pytest.raises(InvalidRequestError) as info:
        await emb.embed(request("abc", dimensions=9))
    assert info.value.param == "dimensions" and info.value.code == "invalid_value"
    await emb.close()


def test_settings_are_checked_at_start_naming_the_field():
    model = ModelConfig(id="m", capability="embeddings", engine="sentence_transformers", path="/x")
    assert SentenceTransformersSettings.of(model) == SentenceTransformersSettings()
    bad = model.model_copy(update={"settings": {"max_batch_size": 0}})
    with pytest.raises(ConfigError, match=r"models\[m\]\.settings\.max_batch_size"):
        SentenceTransformersSettings.of(bad)
    unknown = model.model_copy(update={"settings": {"n_threads": 2}})
    with pytest.raises(ConfigError, match="n_threads"):
        SentenceTransformersSettings.of(unknown)


def test_several_encoder_threads_need_a_thread_safe_engine():
    engine = FakeEngine()
    engine.thread_safe = False
    with pytest.raises(ConfigError, match="encoder_threads"):
        Embedder(engine, EmbeddingsSettings(encoder_threads=2), LimitsConfig())
